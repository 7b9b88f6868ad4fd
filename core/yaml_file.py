"""A YAML config read from a local path or a gs:// URL, with one-line errors."""

from __future__ import annotations

from typing import Any

import yaml

from core import storage
from core.errors import first_line


def read_yaml(path: str, label: str, error: type[Exception]) -> Any:
    """The parsed YAML at PATH (local or gs://); ``error`` names ``label`` and PATH when the
    file is missing or is not YAML."""
    if not storage.exists(path):
        raise error(f"{label} {path} does not exist")
    try:
        return yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as exc:
        raise error(f"{label} {path} is not valid YAML: {first_line(exc)}") from None
