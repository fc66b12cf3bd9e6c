"""Datasets: listing and counts, upload staging and ingest, the manifest, combine, exports.

Torch-free (the API imports it); the ingest and export tasks in workers/ call into it.
"""
