"""``gradlens trace``: a training run's steps as a time series, its spikes explained (run.py)."""
