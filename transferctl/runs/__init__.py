"""What training leaves on disk: the run directory and its files, folders of runs, the cache folder, safe tensor reading."""
