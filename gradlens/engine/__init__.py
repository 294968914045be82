"""The streamed lm_head engine (large vocabularies and long batches)."""
