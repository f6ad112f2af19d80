"""The executor: claims queued jobs and runs their pipelines in worker processes (see executor.py)."""
