"""Networks: building a backbone from any weights source, layer groups and HEAD, cuts, python: and timm: models, the catalog."""
