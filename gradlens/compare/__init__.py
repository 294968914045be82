"""``gradlens compare``: every loss on one batch, diagnosed side by side (`run_compare`)."""

from gradlens.compare.run import run_compare

__all__ = ["run_compare"]
