"""`python -m cluster up|status|down` on the wire, against the recording API server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster import raycluster, rbac
from cluster.__main__ import main
from cluster.config import load_config
from cluster.kubeapi import Kube, KubeApiError, new_api_client
from core.errors import UserError

REPO = Path(__file__).resolve().parents[2]
GKE = str(REPO / "examples" / "cluster-gke.yaml")
NS = "/api/v1/namespaces/t5ft"
RC = "/apis/ray.io/v1/namespaces/t5ft/rayclusters"
RBAC = "/apis/rbac.authorization.k8s.io/v1/namespaces/t5ft"
PM = "/apis/monitoring.googleapis.com/v1/namespaces/t5ft/podmonitorings"
NOT_READY = {"state": "", "conditions": [{"type": "HeadPodReady", "status": "False"}]}
READY = {"state": "ready", "conditions": [
    {"type": "HeadPodReady", "status": "True"},
    {"type": "RayClusterProvisioned", "status": "True"}]}


def _run(argv, kubeconfig, capsys, stderr: list | None = None) -> dict:
    code = main([*argv, "--config", GKE, "--kubeconfig", str(kubeconfig), "--json",
                 "--retry-backoff", "0.01"])
    assert code == 0
    captured = capsys.readouterr()
    if stderr is not None:
        stderr.append(captured.err)
    return json.loads(captured.out.strip().splitlines()[-1])


def test_up_creates_everything_then_waits_for_ready(api, kubeconfig, capsys):
    api.statuses[f"{RC}/t5ft"] = [NOT_READY, NOT_READY, READY]
    summary = _run(["up", "--poll", "0.01", "--timeout", "30"], kubeconfig, capsys)

    posts = [(r.path, r.body["kind"], r.body["metadata"]["name"]) for r in api.calls("POST")]
    assert posts == [
        ("/api/v1/namespaces", "Namespace", "t5ft"),
        (f"{NS}/serviceaccounts", "ServiceAccount", "t5ft-ray"),
        (f"{NS}/serviceaccounts", "ServiceAccount", "t5ft-triton"),
        (f"{RBAC}/roles", "Role", "t5ft-triton-launcher"),
        (f"{RBAC}/rolebindings", "RoleBinding", "t5ft-triton-launcher"),
        (RC, "RayCluster", "t5ft"),
        (PM, "PodMonitoring", "t5ft-ray"),
        (PM, "PodMonitoring", "t5ft-triton"),
    ]
    cfg = load_config(GKE)
    assert api.calls("POST", "rayclusters")[0].body == raycluster.raycluster(cfg)
    assert all(r.authorization == "Bearer test-token" for r in api.requests)
    gets = api.calls("GET", f"{RC}/t5ft")
    assert len(gets) == 3
    # While not ready, up read the pods and events to say why.
    pod_lists = api.calls("GET", f"{NS}/pods")
    assert pod_lists and pod_lists[0].query["labelSelector"] == ["ray.io/cluster=t5ft"]
    assert api.calls("GET", f"{NS}/events")
    assert not api.calls("PATCH") and not api.calls("DELETE")
    assert summary["ready"] is True
    assert summary["dashboard"] == "http://t5ft-head-svc.t5ft.svc.cluster.local:8265"


def test_up_timeout_zero_checks_once_and_does_not_wait(api, kubeconfig, capsys):
    # --timeout 0 is not "the default 900": one check, then the one-line error.
    api.statuses[f"{RC}/t5ft"] = [NOT_READY, READY]
    with pytest.raises(UserError, match=r"^not ready after 0s: "):
        main(["up", "--config", GKE, "--kubeconfig", str(kubeconfig), "--poll", "0.01",
              "--timeout", "0"])
    assert len(api.calls("GET", f"{RC}/t5ft")) == 1


def test_up_patches_what_exists_and_leaves_the_namespace(api, kubeconfig, capsys):
    cfg = load_config(GKE)
    api.put("/api/v1/namespaces/t5ft", rbac.namespace(cfg))
    api.put(f"{RBAC}/roles/t5ft-triton-launcher", rbac.role(cfg))
    old = raycluster.raycluster(cfg)
    old["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 1
    api.put(f"{RC}/t5ft", old)
    api.statuses[f"{RC}/t5ft"] = [READY]
    summary = _run(["up", "--poll", "0.01"], kubeconfig, capsys)

    patches = {r.path: r for r in api.calls("PATCH")}
    assert set(patches) == {f"{RBAC}/roles/t5ft-triton-launcher", f"{RC}/t5ft"}
    assert patches[f"{RC}/t5ft"].content_type == "application/merge-patch+json"
    assert patches[f"{RBAC}/roles/t5ft-triton-launcher"].content_type == \
        "application/strategic-merge-patch+json"
    assert patches[f"{RC}/t5ft"].body["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    assert api.objects[f"{RC}/t5ft"]["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    assert "Namespace/t5ft: exists" in summary["applied"]
    assert "RayCluster/t5ft: patched" in summary["applied"]


def test_up_retries_5xx_with_backoff(api, kubeconfig, capsys):
    api.fail("POST", r"/rayclusters$", 503, times=2)
    api.fail("GET", r"/rayclusters/t5ft$", 500, times=1)
    api.statuses[f"{RC}/t5ft"] = [READY]
    err: list[str] = []
    summary = _run(["up", "--poll", "0.01"], kubeconfig, capsys, err)
    assert len(api.calls("POST", "rayclusters")) == 3
    assert len(api.calls("GET", f"{RC}/t5ft")) == 2
    assert summary["ready"] is True
    assert "create rayclusters.ray.io/t5ft: HTTP 503; retrying in 0.0s (1/5)" in err[0]
    assert "(2/5)" in err[0]


def test_retries_give_up_with_one_line(api, kubeconfig):
    api.fail("POST", r"/rayclusters$", 503, times=10, message="etcdserver: leader changed")
    with pytest.raises(UserError) as err:
        main(["up", "--config", GKE, "--kubeconfig", str(kubeconfig), "--retries", "2",
              "--retry-backoff", "0.01"])
    assert len(api.calls("POST", "rayclusters")) == 3
    msg = str(err.value)
    assert "\n" not in msg
    assert "create rayclusters.ray.io/t5ft in namespace 't5ft' failed: HTTP 503" in msg
    assert "leader changed" in msg


def test_forbidden_is_one_line_naming_verb_resource_namespace(api, kubeconfig):
    api.fail("POST", r"/rolebindings$", 403, message=(
        'rolebindings.rbac.authorization.k8s.io is forbidden: User "alice@example.com" '
        'cannot create resource "rolebindings" in API group "rbac.authorization.k8s.io" '
        'in the namespace "t5ft"'))
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", "up", "--config", GKE, "--kubeconfig",
         str(kubeconfig), "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "forbidden: cannot create rolebindings.rbac.authorization.k8s.io in namespace " \
           "'t5ft'" in errors[0]
    assert "Role" in errors[0] and "alice@example.com" in errors[0]
    assert not api.calls("POST", "rayclusters")  # stopped at the first failure


def _pod(name, group, ready, **status):
    labels = {"ray.io/cluster": "t5ft", "ray.io/group": group,
              "ray.io/node-type": "head" if group == "headgroup" else "worker"}
    conds = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "t5ft", "labels": labels},
            "spec": {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}
                     if group == "gpu" else None},
            "status": {"phase": "Running" if ready else "Pending",
                       "conditions": conds + status.pop("conditions", []), **status}}


def _event(name, involved, kind, reason, message, type_="Warning"):
    return {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": "t5ft"},
            "involvedObject": {"kind": kind, "name": involved, "namespace": "t5ft"},
            "reason": reason, "message": message, "type": type_}


def test_status_says_which_group_is_short_of_what(api, kubeconfig, capsys):
    cfg = load_config(GKE)
    rc = raycluster.raycluster(cfg)
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = 2  # autoscaler asked for 2 converters
    rc["spec"]["workerGroupSpecs"][1]["replicas"] = 1
    api.put(f"{RC}/t5ft", rc)
    api.statuses[f"{RC}/t5ft"] = [NOT_READY]
    api.put(f"{NS}/pods/head", _pod("head", "headgroup", True))
    api.put(f"{NS}/pods/conv-1", _pod("conv-1", "convert", True))
    api.put(f"{NS}/pods/gpu-1", _pod("gpu-1", "gpu", False, conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 "
                   "nodes are available: 3 No preemption victims found."}]))
    api.put(f"{NS}/events/e1", _event("e1", "gpu-1", "Pod", "NotTriggerScaleUp",
                                      "pod didn't trigger scale-up: 1 max node group size "
                                      "reached, 2 node(s) didn't match Pod's node "
                                      "affinity/selector", "Normal"))
    api.put(f"{NS}/events/e2", _event("e2", "t5ft", "RayCluster", "FailedToCreateWorkerPod",
                                      'pods "t5ft-convert-x" is forbidden: exceeded quota: '
                                      "compute, requested: cpu=15, used: cpu=20, limited: "
                                      "cpu=32"))
    summary = _run(["status"], kubeconfig, capsys)
    groups = {g["group"]: g for g in summary["groups"]}
    assert summary["ready"] is False
    assert groups["headgroup"]["ok"] is True
    gpu = groups["gpu"]
    assert (gpu["desired"], gpu["ready"], gpu["existing"]) == (1, 0, 1)
    assert gpu["short"] == ["nvidia.com/gpu"]
    assert any("node pool is at its maximum size" in r for r in gpu["reasons"])
    assert any("cloud.google.com/gke-accelerator=nvidia-a100-80gb" in r for r in gpu["reasons"])
    conv = groups["convert"]
    assert (conv["desired"], conv["ready"], conv["existing"]) == (2, 1, 1)
    assert any("1 pod(s) not created: FailedToCreateWorkerPod" in r and "exceeded quota" in r
               for r in conv["reasons"])
    # Human form: one line per group.
    assert main(["status", "--config", GKE, "--kubeconfig", str(kubeconfig)]) == 0
    out = capsys.readouterr().out
    assert "gpu: 0/1 ready (1 pods exist); short of nvidia.com/gpu" in out


def test_status_of_a_missing_cluster_says_so(api, kubeconfig):
    with pytest.raises(UserError, match="RayCluster t5ft not found in namespace 't5ft'"):
        main(["status", "--config", GKE, "--kubeconfig", str(kubeconfig)])


def test_down_deletes_ours_and_leftover_tritons(api, kubeconfig, capsys):
    cfg = load_config(GKE)
    api.put(f"{RC}/t5ft", raycluster.raycluster(cfg))
    api.put(f"{RBAC}/roles/t5ft-triton-launcher", rbac.role(cfg))
    triton_labels = {"app.kubernetes.io/name": "triton", "app.kubernetes.io/instance": "x",
                     "app.kubernetes.io/managed-by": "t5x-ft-ray"}
    api.put("/apis/apps/v1/namespaces/t5ft/deployments/triton-x",
            {"kind": "Deployment", "metadata": {"name": "triton-x", "labels": triton_labels}})
    api.put("/apis/apps/v1/namespaces/t5ft/deployments/other",
            {"kind": "Deployment", "metadata": {"name": "other", "labels": {"app": "other"}}})
    summary = _run(["down"], kubeconfig, capsys)
    deletes = [r.path for r in api.calls("DELETE")]
    assert deletes == [
        f"{RC}/t5ft",
        "/apis/apps/v1/namespaces/t5ft/deployments/triton-x",
        f"{PM}/t5ft-ray",
        f"{PM}/t5ft-triton",
        f"{RBAC}/rolebindings/t5ft-triton-launcher",
        f"{RBAC}/roles/t5ft-triton-launcher",
        f"{NS}/serviceaccounts/t5ft-triton",
        f"{NS}/serviceaccounts/t5ft-ray",
    ]
    assert all(r.body == {"propagationPolicy": "Background"} for r in api.calls("DELETE"))
    assert summary["deleted"] == ["RayCluster/t5ft", "Deployment/triton-x",
                                  "Role/t5ft-triton-launcher"]
    assert "/apis/apps/v1/namespaces/t5ft/deployments/other" in api.objects


def test_up_job_runs_a_rayjob_to_completion(api, kubeconfig, capsys):
    path = "/apis/ray.io/v1/namespaces/t5ft/rayjobs/t5ft-job"
    api.statuses[path] = [{"jobDeploymentStatus": "Initializing"},
                          {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                          {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                           "jobId": "raysubmit_1"}]
    summary = _run(["up", "--job", "python -m ray_jobs.pipeline --config gs://b/p.yaml",
                    "--runtime-env-json", '{"env_vars": {"HF_HOME": "/tmp/hf"}}',
                    "--poll", "0.01"], kubeconfig, capsys)
    post = api.calls("POST", "rayjobs")[0]
    assert post.body["spec"]["entrypoint"] == "python -m ray_jobs.pipeline --config gs://b/p.yaml"
    assert yaml.safe_load(post.body["spec"]["runtimeEnvYAML"]) == {"env_vars": {
        "HF_HOME": "/tmp/hf", "RAY_JOB_STOP_WAIT_TIME_S": str(raycluster.JOB_STOP_WAIT_S)}}
    assert not api.calls("POST", "rayclusters")
    assert summary["job_status"] == "SUCCEEDED" and summary["job_id"] == "raysubmit_1"
    api.reset()
    api.statuses[path] = [{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                           "message": "Job failed\nwith a trace"}]
    with pytest.raises(UserError, match="RayJob t5ft-job ended FAILED"):
        main(["up", "--config", GKE, "--kubeconfig", str(kubeconfig), "--job", "python x.py",
              "--poll", "0.01"])


def test_kube_get_and_delete_of_missing_objects(api):
    from kubernetes import client

    kube = Kube(client.ApiClient(client.Configuration(host=api.url)), retries=0)
    assert kube.get("Deployment", "nope", "t5ft") is None
    assert kube.delete("Service", "nope", "t5ft") is False
    api.fail("GET", "pods", 401)
    with pytest.raises(KubeApiError, match="unauthorized"):
        kube.list("Pod", "t5ft")
    with pytest.raises(ValueError, match="cannot apply kind 'ClusterRole'"):
        kube.create({"kind": "ClusterRole", "metadata": {"name": "x"}})


def test_request_timeout_bounds_a_stalled_call(api, kubeconfig):
    """A slow API server costs at most call_seconds_bound() per verb (serve's teardown relies
    on it to fit the job stop grace), and a call that times out for good is one line."""
    kube = Kube(new_api_client(str(kubeconfig)), retries=1, backoff=0.01, request_timeout=0.5)
    assert kube.call_seconds_bound() == 2 * 0.5 + 0.01
    api.put(f"{NS}/services/slow", {"apiVersion": "v1", "kind": "Service",
                                    "metadata": {"name": "slow"}})
    api.stall("GET", r"/services/slow$", 1.5, times=1)
    assert kube.get("Service", "slow", "t5ft")["metadata"]["name"] == "slow"  # the retry
    api.stall("GET", r"/services/slow$", 1.5, times=2)
    started = time.monotonic()
    with pytest.raises(KubeApiError) as err:
        kube.get("Service", "slow", "t5ft")
    assert time.monotonic() - started < kube.call_seconds_bound() + 0.5
    assert str(err.value) == (f"cannot reach the Kubernetes API at {api.url} to get "
                              f"services/slow in namespace 't5ft': ReadTimeoutError")


def test_missing_kuberay_crd_is_named(api, kubeconfig):
    api.fail("POST", r"/rayclusters$", 404, message="the server could not find the requested "
             "resource")
    with pytest.raises(UserError, match=r"no rayclusters.ray.io .*KubeRay operator installed.*"
                                        r"--version 1\.7\.0\)"):
        main(["up", "--config", GKE, "--kubeconfig", str(kubeconfig)])


def test_load_balancer_dashboard_address(api, kubeconfig, capsys, tmp_path):
    import yaml

    data = yaml.safe_load(Path(GKE).read_text())
    data["head"]["service_type"] = "LoadBalancer"
    config = tmp_path / "lb.yaml"
    config.write_text(yaml.safe_dump(data))
    api.statuses[f"{RC}/t5ft"] = [READY]
    api.put(f"{NS}/services/t5ft-head-svc", {"kind": "Service",
                                              "metadata": {"name": "t5ft-head-svc"}})
    api.statuses[f"{NS}/services/t5ft-head-svc"] = [
        {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}]
    assert main(["up", "--config", str(config), "--kubeconfig", str(kubeconfig), "--json",
                 "--poll", "0.01"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dashboard"] == "http://203.0.113.7:8265"
    rc = api.calls("POST", "rayclusters")[0].body
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "LoadBalancer"
