"""Dataset export: the task that writes WebDataset shards, a dataset card and Croissant metadata."""
