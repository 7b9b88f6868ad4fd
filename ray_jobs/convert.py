"""Convert a T5X checkpoint into a Triton model repository of FasterTransformer shards.

    python -m ray_jobs.convert --src SRC --dst DST [--tensor-parallel 2] [--json] ...

SRC is a T5X checkpoint folder (legacy msgpack + zarr, or orbax OCDBT), or a folder of
checkpoint_<step> folders (the newest is used); SRC and DST may be local or gs:// URLs.
One Ray task converts each layer (and one the globals); see conversion/run.py. The flags are
conversion.options.ConvertOptions' fields.
"""

from __future__ import annotations

import argparse
import logging

from conversion.options import ConvertOptions
from conversion.run import convert
from ray_jobs import _cli


def build_parser() -> argparse.ArgumentParser:
    """The command line: ConvertOptions' flags plus --address and --json."""
    return _cli.stage_parser("convert", ConvertOptions.COMMAND_HELP, ConvertOptions)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, convert, print the summary."""
    args = build_parser().parse_args(argv)
    opts = _cli.options_from_args(ConvertOptions, args)  # ConvertOptions checks the values
    summary = convert(opts, connect=lambda: _cli.init_ray(
        args.address, log_to_driver=False, logging_level=logging.ERROR))
    _cli.emit_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
