"""Every object we render validates, grants nothing cluster-wide, and says what the docs say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cluster import raycluster, rbac, triton
from cluster.__main__ import render_objects
from cluster.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("cluster*.yaml"))
K8S_VERSION = "1.33"  # GKE regular channel at the time of writing


def _all_rendered() -> list[tuple[str, dict]]:
    out = []
    for path in EXAMPLES:
        cfg = load_config(path)
        for obj in render_objects(cfg):
            out.append((path.name, obj))
        out.append((path.name, raycluster.rayjob(
            cfg, "python -m ray_jobs.pipeline --config gs://b/p.yaml --json",
            {"env_vars": {"HF_HOME": "/tmp/hf"}})))
        spec = triton.TritonSpec(image="example.com/t5ft/serving:1", model_name="ul2_20b", model_repository="gs://b/repo",
                                 namespace=cfg.namespace, gpus=2, replicas=2,
                                 accelerator=cfg.triton_accelerator,
                                 service_account=cfg.service_accounts.triton)
        fuse = triton.TritonSpec(**{**spec.__dict__, "mount_repository": True})
        out += [(path.name, triton.deployment(spec)), (path.name, triton.service(spec)),
                (path.name, triton.deployment(fuse))]
    return out


RENDERED = _all_rendered()


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"cluster-gke.yaml", "cluster-small.yaml"}
    gke = load_config(REPO / "examples" / "cluster-gke.yaml")
    assert gke.gpu_workers.accelerator in ("nvidia-a100-80gb", "nvidia-h100-80gb")
    assert gke.cpu_workers is not None


@pytest.mark.parametrize("source,obj", RENDERED,
                         ids=[f"{s}:{o['kind']}/{o['metadata']['name']}" for s, o in RENDERED])
def test_every_object_validates(source, obj, crd_validators):
    if obj["kind"] in crd_validators:
        errors = sorted(crd_validators[obj["kind"]].iter_errors(obj), key=lambda e: e.path)
        assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
        if obj["kind"] == "PodMonitoring":
            return
        # The pod templates inside are core objects: validate them strictly too.
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        templates = [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec["workerGroupSpecs"]]
        if "submitterPodTemplate" in obj["spec"]:
            templates.append(obj["spec"]["submitterPodTemplate"])
        for template in templates:
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                   "spec": template["spec"]}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_misplaced_node_selector(crd_validators):
    """ray-project/ray #50298: a nodeSelector beside the template instead of in its spec."""
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    rc = raycluster.raycluster(cfg)
    rc["spec"]["workerGroupSpecs"][1]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "x"}
    assert list(crd_validators["RayCluster"].iter_errors(rc))
    dep = triton.deployment(triton.TritonSpec(image="example.com/t5ft/serving:1", model_name="m", model_repository="gs://b/r"))
    dep["spec"]["template"]["nodeSelector"] = {"a": "b"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_nothing_cluster_wide_is_granted():
    kinds = {obj["kind"] for _, obj in RENDERED}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    for _, obj in RENDERED:
        text = json.dumps(obj)
        assert "cluster-admin" not in text
        if obj["kind"] == "RoleBinding":
            assert obj["roleRef"]["kind"] == "Role"
            assert all(s["kind"] == "ServiceAccount" for s in obj["subjects"])


def test_role_grants_exactly_what_launching_triton_needs():
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    role = rbac.role(cfg)
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    launch = {"get", "list", "watch", "create", "patch", "delete"}
    expected = ({("apps", "deployments", v) for v in launch}
                | {("", "services", v) for v in launch}
                | {("", "pods", v) for v in ("get", "list", "watch")}
                | {("", "pods/log", "get"), ("", "events", "list"),
                   ("", "serviceaccounts", "get"), ("ray.io", "rayclusters", "get"),
                   ("ray.io", "rayjobs", "get")})
    assert granted == expected
    # Least privilege: the Deployment's ReplicaSet creates pods, never the Ray head.
    assert not {v for g, r, v in granted if r == "pods"} & {"create", "patch", "delete"}
    assert not any("*" in str(rule) for rule in role["rules"])
    binding = rbac.role_binding(cfg)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "t5ft-ray",
                                    "namespace": "t5ft"}]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == "t5ft"


def test_workload_identity_and_token_mounts():
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    # One Google account per role: the runner (read-write) for Ray, a read-only one for Triton.
    for name, gsa in (("t5ft-ray", "t5ft-runner"), ("t5ft-triton", "t5ft-triton")):
        sa = rbac.service_account(cfg, name)
        assert sa["metadata"]["annotations"] == {
            "iam.gke.io/gcp-service-account": f"{gsa}@my-gcp-project.iam.gserviceaccount.com"}
    spec = raycluster.raycluster(cfg)["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "t5ft-ray" and head["automountServiceAccountToken"]
    for group in spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert env["T5FT_TRITON_SERVICE_ACCOUNT"] == "t5ft-triton"
    assert env["T5FT_TRITON_ACCELERATOR"] == "nvidia-a100-80gb"


def test_gpu_group_scheduling_and_autoscaling():
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    spec = raycluster.raycluster(cfg)["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    cpu, gpu = spec["workerGroupSpecs"]
    assert (cpu["groupName"], cpu["minReplicas"], cpu["maxReplicas"]) == ("convert", 0, 8)
    assert "nodeSelector" not in cpu["template"]["spec"]
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["containers"][0]["image"].endswith("-gpu")
    small = raycluster.raycluster(load_config(REPO / "examples" / "cluster-small.yaml"))
    spot = small["spec"]["workerGroupSpecs"][1]["template"]["spec"]
    assert spot["nodeSelector"]["cloud.google.com/gke-spot"] == "true"


def test_ray_pods_run_as_non_root():
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    spec = raycluster.raycluster(cfg)["spec"]
    for template in [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec["workerGroupSpecs"]]:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert template["spec"]["securityContext"]["runAsUser"] == 1000
        ctx = template["spec"]["containers"][0]["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]


def test_triton_deployment_contents():
    spec = triton.TritonSpec(image="example.com/t5ft/serving:1", model_name="UL2_20b", model_repository="gs://bkt/repo",
                             namespace="t5ft", gpus=4, replicas=2,
                             accelerator="nvidia-h100-80gb", service_account="t5ft-triton")
    dep = triton.deployment(spec)
    assert dep["metadata"]["name"] == "triton-ul2-20b"
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "--model-repository=gs://bkt/repo" in c["args"]
    assert "--load-model=UL2_20b" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    svc = triton.service(spec)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # `down` finds every model's Deployment and Service by triton.SELECTOR; the PodMonitoring
    # finds their pods by it.
    for labels in (dep["metadata"]["labels"], svc["metadata"]["labels"],
                   dep["spec"]["template"]["metadata"]["labels"]):
        assert triton.SELECTOR.items() <= labels.items()
    assert triton.endpoints(spec) == {
        "grpc": "triton-ul2-20b.t5ft.svc.cluster.local:8001",
        "http": "triton-ul2-20b.t5ft.svc.cluster.local:8000",
        "metrics": "triton-ul2-20b.t5ft.svc.cluster.local:8002"}


def _gke_dict() -> dict:
    return yaml.safe_load((REPO / "examples" / "cluster-gke.yaml").read_text())


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["gpu_workers"].update(node_selector={"a": "b"}), "gpu_workers.node_selector"),
    (lambda d: d["gpu_workers"].pop("accelerator"), "gpu_workers.accelerator"),
    (lambda d: d["cpu_workers"].update(min_replicas=9), "cpu_workers.min_replicas"),
    (lambda d: d["head"].update(memory="lots"), "head.memory"),
    (lambda d: d.pop("namespace"), "config.namespace"),
    (lambda d: d["service_accounts"].update(google_service_account="me@gmail.com"),
     "google_service_account"),
    (lambda d: d.update(ray_version="2.9.0"), "ray_version"),
])
def test_config_errors_name_the_key(edit, message):
    data = _gke_dict()
    edit(data)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(data)


def test_render_cli(tmp_path):
    out = tmp_path / "all.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster", "render", "--config", "examples/cluster-small.yaml",
         "--output", str(out), "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [f"{d['kind']}/{d['metadata']['name']}" for d in docs] == summary["objects"]
    assert [d["kind"] for d in docs][-3:] == ["RayCluster", "PodMonitoring", "PodMonitoring"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(out.read_text().split("---")[0] + "\nfoo: 1\n")
    proc = subprocess.run([sys.executable, "-m", "cluster", "render", "--config", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr
