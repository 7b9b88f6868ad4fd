"""serving.api.open_servers: the repository is checked before anything starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.errors import UserError
from serving.api import ServeError, open_servers


def _opts(repo, **kw) -> SimpleNamespace:
    """The ServeOptions fields open_servers reads (attribute access only)."""
    base = dict(model_repository=str(repo), model_name="t5", backend="local", replicas=1,
                grpc_port=0, http_port=0, metrics_port=0, host="127.0.0.1", ready_timeout=30.0,
                num_cpus=1.0, log_verbose=0, namespace="default", image=None, kubeconfig=None,
                service_account=None)
    return SimpleNamespace(**{**base, **kw})


def test_local_backend_names_a_missing_config(tmp_path):
    with pytest.raises(ServeError, match=r"/t5/config\.pbtxt not found$") as err:
        open_servers(_opts(tmp_path))
    assert isinstance(err.value, UserError)


def test_kubernetes_backend_reads_the_gpu_count_first(tmp_path):
    with pytest.raises(UserError, match=r"cannot read .*/t5/config\.pbtxt.*tensor_para_size"):
        open_servers(_opts(tmp_path, backend="kubernetes"))
