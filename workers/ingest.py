"""Dataset ingest: the task that reads an uploaded archive into a real dataset."""
