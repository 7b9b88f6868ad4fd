"""One ``tritonserver`` process, launched and watched from plain Python: no Ray needed.

- :mod:`.wheel`: the nvidia-pytriton wheel's binary, libraries and Python backend stub;
- :mod:`.environment`: the server's environment, working directory, ports, node address;
- :mod:`.staging`: gs:// repositories checked and downloaded to the serving node;
- :mod:`.process`: :class:`TritonServer`, the process, its watcher (restarts) and its log;
- :mod:`.ready`: readiness probes with a tenacity wait;
- ``__main__``: ``python -m serving.tritonserver`` (docs/interfaces.md).
"""

from serving.tritonserver.environment import (
    _ANY_HOSTS,
    free_ports,
    jax_cache_dir,
    node_ip,
    server_env,
    stub_cwd,
)
from serving.tritonserver.errors import ServerError
from serving.tritonserver.process import TritonServer
from serving.tritonserver.staging import _check_repository, check_repository, is_gcs, stage_model
from serving.tritonserver.wheel import prepare_backends, pytriton_dist, pytriton_libs

__all__ = [
    "_ANY_HOSTS", "ServerError", "TritonServer", "_check_repository", "check_repository",
    "free_ports", "is_gcs", "jax_cache_dir", "node_ip", "prepare_backends", "pytriton_dist",
    "pytriton_libs", "server_env", "stage_model", "stub_cwd",
]
