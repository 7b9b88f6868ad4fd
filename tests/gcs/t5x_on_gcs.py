"""Moved to demo/t5x_gcs.py (bench uses it too); kept so the tests' imports stay as they are."""

from demo.t5x_gcs import DUMMY_BUCKET, write_t5x_checkpoint_gcs  # noqa: F401
