"""Experiments: the classifier protocol of PAPER.md section 4 as jobs of kind `experiment`.

The grid, runs, mixtures, the feature cache, metrics, reports and plots. Torch-free: the API
validates grids, builds reports and draws plots without it; workers/train.py trains.
"""
