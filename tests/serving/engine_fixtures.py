"""Moved to demo/ft_writer.py (bench uses it too); kept so the tests' imports stay as they are."""

from demo.ft_writer import (  # noqa: F401
    T5_TINY,
    UL2_TINY,
    random_ft_weights,
    tensor_stem,
    write_ft_folder,
)
