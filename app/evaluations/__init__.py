"""Quality and privacy of synthetic data (issue 23): an evaluation is a job of kind
`evaluation` (one chunk, `train` queue) that measures a synthetic dataset against real data.
service.py validates a request and says which images each part reads; views.py is the public
view. The measures are models/quality.py, models/ita.py, models/memorisation.py; the task is
workers/evaluate.py. No torch here.
"""

# The worker's stages, in order: a chunk's step counts them (progress), the view names them.
STAGES = ("features", "fidelity", "utility", "skin tone", "memorisation", "figures")


def plot_key(job_id: str, name: str, fmt: str) -> str:
    """Where the worker stores a figure (PNG or SVG) and the API reads it."""
    return f"evaluations/{job_id}/plots/{name}.{fmt}"
