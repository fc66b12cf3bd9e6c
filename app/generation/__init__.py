"""Generation: POST /jobs. Strategies' parameters, model checks, parent selection, create_job.

The sampling itself runs in workers/generate.py (torch side); this package is torch-free.
"""
