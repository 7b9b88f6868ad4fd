"""`ray_jobs.serve --backend kubernetes` on the wire: launch, ready line, SIGTERM, delete."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cluster import triton
from core.errors import UserError
from serving import kubernetes as k8s_serving

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = "/apis/apps/v1/namespaces/t5ft/deployments"
SERVICES = "/api/v1/namespaces/t5ft/services"
TRITON_KSA = "/api/v1/namespaces/t5ft/serviceaccounts/t5ft-triton"


@pytest.fixture
def api(fake_api):
    """The fake API, emptied, holding the Triton service account `python -m cluster up`
    creates (serve checks it exists before creating anything)."""
    fake_api.reset()
    fake_api.put(TRITON_KSA, {"apiVersion": "v1", "kind": "ServiceAccount",
                              "metadata": {"name": "t5ft-triton", "namespace": "t5ft"}})
    return fake_api


@pytest.fixture
def model_repo(tmp_path) -> Path:
    """A model repository whose config.pbtxt asks for tensor-parallel 2."""
    cfg = model_config_pb2.ModelConfig(name="ul2", backend="fastertransformer",
                                       max_batch_size=1024)
    cfg.parameters["tensor_para_size"].string_value = "2"
    cfg.parameters["pipeline_para_size"].string_value = "1"
    (tmp_path / "repo" / "ul2").mkdir(parents=True)
    (tmp_path / "repo" / "ul2" / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return tmp_path / "repo"


def _serve(kubeconfig, model_repo, *extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("T5FT_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.serve", "--backend", "kubernetes",
         "--kubeconfig", str(kubeconfig), "--model-repository", str(model_repo),
         "--model-name", "ul2", "--namespace", "t5ft", "--replicas", "2",
         "--service-account", "t5ft-triton", "--image", "example.com/triton-ft:1",
         "--ready-timeout", "30", "--json", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc: subprocess.Popen, timeout: float = 30) -> str:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"no ready line; stderr: {proc.stderr.read()}") from None


READY = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}


def test_launch_ready_line_then_sigterm_deletes(api, kubeconfig, model_repo):
    api.statuses[f"{DEPLOYMENTS}/triton-ul2"] = [READY]
    proc = _serve(kubeconfig, model_repo)
    line = _first_line(proc)
    assert json.loads(line) == {"model": "ul2", "endpoints": [{
        "grpc": "triton-ul2.t5ft.svc.cluster.local:8001",
        "http": "triton-ul2.t5ft.svc.cluster.local:8000",
        "metrics": "triton-ul2.t5ft.svc.cluster.local:8002"}]}
    assert not api.calls("DELETE")  # still serving
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    posts = api.calls("POST")
    assert [r.path for r in posts] == [SERVICES, DEPLOYMENTS]
    dep = posts[1].body
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "example.com/triton-ft:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"  # tensor_para_size
    assert f"--model-repository={model_repo}" in container["args"]
    assert pod["serviceAccountName"] == "t5ft-triton"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert posts[0].body["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [r.path for r in api.calls("DELETE")] == [f"{DEPLOYMENTS}/triton-ul2",
                                                     f"{SERVICES}/triton-ul2"]
    assert list(api.objects) == [TRITON_KSA]  # ours are gone; the account is not ours


def test_existing_objects_are_patched(api, kubeconfig, model_repo):
    spec = triton.TritonSpec(image="example.com/t5ft/serving:1", model_name="ul2", model_repository="old", namespace="t5ft")
    api.put(f"{DEPLOYMENTS}/triton-ul2", triton.deployment(spec))
    api.put(f"{SERVICES}/triton-ul2", triton.service(spec))
    api.statuses[f"{DEPLOYMENTS}/triton-ul2"] = [READY | {"observedGeneration": 2}]
    proc = _serve(kubeconfig, model_repo)
    assert json.loads(_first_line(proc))["model"] == "ul2"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    patched = {r.path: r for r in api.calls("PATCH")}
    assert set(patched) == {f"{DEPLOYMENTS}/triton-ul2", f"{SERVICES}/triton-ul2"}
    assert patched[f"{DEPLOYMENTS}/triton-ul2"].content_type == \
        "application/strategic-merge-patch+json"
    args = patched[f"{DEPLOYMENTS}/triton-ul2"].body["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert f"--model-repository={model_repo}" in args


def test_forbidden_deployment_fails_in_one_line_and_cleans_up(api, kubeconfig, model_repo):
    api.fail("POST", "/deployments$", 403, message=(
        'deployments.apps is forbidden: User "system:serviceaccount:t5ft:t5ft-ray" cannot '
        'create resource "deployments" in API group "apps" in the namespace "t5ft"'))
    proc = _serve(kubeconfig, model_repo)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: forbidden: cannot create deployments.apps in namespace "
                           "'t5ft'")
    assert "Role" in last
    assert out == ""
    # The Service made before the failure is gone again.
    assert [r.path for r in api.calls("DELETE")] == [f"{SERVICES}/triton-ul2"]


def _args(model_repo, **kw) -> argparse.Namespace:
    base = dict(model_repository=str(model_repo), model_name="ul2", replicas=1, grpc_port=0,
                http_port=0, metrics_port=0, ready_timeout=120, json=True,
                namespace="default", image=None, kubeconfig=None, service_account=None)
    return argparse.Namespace(**{**base, **kw})


def test_defaults_come_from_the_ray_head_environment(model_repo, monkeypatch):
    monkeypatch.setenv("T5FT_NAMESPACE", "t5ft")
    monkeypatch.setenv("T5FT_TRITON_IMAGE", "img:1")
    monkeypatch.setenv("T5FT_TRITON_SERVICE_ACCOUNT", "t5ft-triton")
    monkeypatch.setenv("T5FT_TRITON_ACCELERATOR", "nvidia-h100-80gb")
    monkeypatch.setenv("T5FT_TRITON_RUN_AS_USER", "")
    spec = k8s_serving.triton_spec(_args(model_repo, grpc_port=9001))
    assert (spec.namespace, spec.image, spec.service_account, spec.accelerator) == (
        "t5ft", "img:1", "t5ft-triton", "nvidia-h100-80gb")
    assert spec.gpus == 2 and spec.run_as_user is None
    assert triton.endpoints(spec)["grpc"] == "triton-ul2.t5ft.svc.cluster.local:9001"
    # Flags win over the environment.
    spec = k8s_serving.triton_spec(_args(model_repo, namespace="other", image="mine:2"))
    assert (spec.namespace, spec.image) == ("other", "mine:2")


def test_missing_or_bad_model_config_is_a_clear_error(model_repo):
    with pytest.raises(UserError, match=r"cannot read .*/nope/config\.pbtxt.*tensor_para_size"):
        k8s_serving.triton_spec(_args(model_repo, model_name="nope"))
    (model_repo / "ul2" / "config.pbtxt").write_text(
        'parameters { key: "tensor_para_size" value { string_value: "two" } }')
    with pytest.raises(UserError, match="tensor_para_size is 'two'"):
        k8s_serving.triton_spec(_args(model_repo))


def test_wait_reports_why_replicas_are_pending(api, capsys):
    from kubernetes import client

    from cluster.kubeapi import Kube

    kube = Kube(client.ApiClient(client.Configuration(host=api.url)), retries=0)
    spec = triton.TritonSpec(image="example.com/t5ft/serving:1", model_name="ul2", model_repository="gs://b/r", namespace="t5ft",
                             gpus=8, accelerator="nvidia-h100-80gb")
    api.put(f"{DEPLOYMENTS}/triton-ul2", triton.deployment(spec))
    api.statuses[f"{DEPLOYMENTS}/triton-ul2"] = [
        {"observedGeneration": 1, "replicas": 1}, {"observedGeneration": 1, "replicas": 1},
        READY]
    labels = triton.deployment(spec)["spec"]["template"]["metadata"]["labels"]
    api.put("/api/v1/namespaces/t5ft/pods/triton-ul2-abc", {
        "kind": "Pod", "metadata": {"name": "triton-ul2-abc", "labels": labels},
        "spec": {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
        "status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False",
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}})
    api.put("/api/v1/namespaces/t5ft/events/ev", {
        "kind": "Event", "metadata": {"name": "ev"}, "reason": "TriggeredScaleUp",
        "involvedObject": {"kind": "Pod", "name": "triton-ul2-abc"},
        "message": "pod triggered scale-up: [{gpu-pool 0->1 (max: 2)}]"})
    k8s_serving.wait_ready(kube, spec, 30, threading.Event(), poll=0.01)
    err = capsys.readouterr().err
    assert ("triton-ul2: 0/1 ready, 1 pods; short of nvidia.com/gpu; cluster autoscaler is "
            "adding a node (TriggeredScaleUp)") in err
    api.statuses[f"{DEPLOYMENTS}/triton-ul2"] = [{"observedGeneration": 1}]
    with pytest.raises(UserError, match="triton-ul2 not ready after 0s: .*short of nvidia"):
        k8s_serving.wait_ready(kube, spec, 0.05, threading.Event(), poll=0.01)
    # A SIGTERM mid-wait ends it with the last reason; one before it makes no call at all.
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    with pytest.raises(UserError, match=r"^stopped before triton-ul2 was ready: .*short of nvidia"):
        k8s_serving.wait_ready(kube, spec, 30, stop, poll=0.01)
    timer.join()
    calls = len(api.calls("GET", "deployments"))
    with pytest.raises(UserError, match=r"^stopped before triton-ul2 was ready$"):
        k8s_serving.wait_ready(kube, spec, 30, stop, poll=0.01)
    assert len(api.calls("GET", "deployments")) == calls


def test_gpu_count_read_from_a_gs_model_repository(monkeypatch):
    """The real path on GKE: config.pbtxt read from gs:// (here fake-gcs-server)."""
    from core import gcs_env
    from testing import gcs_emulator

    proc, url = gcs_emulator.start_emulator()
    try:
        for key, value in gcs_env.emulator_env(url).items():
            monkeypatch.setenv(key, value)
        client = gcs_env.storage_client()
        client.create_bucket("t5ft-cluster")
        cfg = model_config_pb2.ModelConfig(name="ul2", backend="fastertransformer")
        cfg.parameters["tensor_para_size"].string_value = "4"
        cfg.parameters["pipeline_para_size"].string_value = "2"
        client.bucket("t5ft-cluster").blob("repo/ul2/config.pbtxt").upload_from_string(
            text_format.MessageToString(cfg))
        spec = k8s_serving.triton_spec(_args("gs://t5ft-cluster/repo", image="example.com/t5ft/serving:1"))
        assert spec.gpus == 8
        assert "--model-repository=gs://t5ft-cluster/repo" in \
            triton.deployment(spec)["spec"]["template"]["spec"]["containers"][0]["args"]
        with pytest.raises(UserError, match="cannot read gs://t5ft-cluster/repo/nope/"):
            k8s_serving.triton_spec(_args("gs://t5ft-cluster/repo", model_name="nope"))
    finally:
        proc.kill()
        proc.wait()
