"""gs:// model repositories: checked, then downloaded to the node that serves them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from core import storage
from core.gcs_env import is_gcs
from core.repository import CONFIG_PBTXT, config_url
from serving.tritonserver.errors import ServerError

LOG = logging.getLogger(__name__)


def stage_model(repository: str, model_name: str, dst: Path) -> Path:
    """Download ``repository/model_name`` (a gs:// URL) into ``dst``; returns the new root.

    tritonserver reads gs:// itself only with credentials in its own environment; going
    through core.storage uses the same client (and emulator settings) as the rest of the
    pipeline, and runs on the node that serves, so every node gets its own copy.
    """
    src = storage.join(repository, model_name)
    names = storage.list_files(src)
    if CONFIG_PBTXT not in names:
        raise ServerError(f"{src} has no {CONFIG_PBTXT}")
    LOG.info("downloading %d files of %s to %s", len(names), src, dst)
    for name in names:
        target = dst / model_name / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with storage.open_read(storage.join(src, name)) as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)
    return dst


def check_repository(model_repository: str, model_name: str) -> None:
    """Raise ServerError unless ``model_repository/model_name/config.pbtxt`` exists."""
    url = config_url(model_repository, model_name)
    ok = storage.exists(url) if is_gcs(model_repository) else Path(url).is_file()
    if not ok:
        raise ServerError(f"model repository {model_repository} has no {model_name}/config.pbtxt")


_check_repository = check_repository  # the name serving.local used
