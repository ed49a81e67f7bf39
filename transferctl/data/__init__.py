"""Images as they reach the network: class folders and splits, decoding and Preprocessing, loaders, the decoded-image cache."""
