"""The GKE path as a user follows it (issue 14): names from one source, GPUs that fit a node,
configs on gs://, `up --job` that waits for the job, least privilege, Triton Deployments that
clean up after themselves. Against the recording API server and fake-gcs-server."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cluster import raycluster, rbac, triton
from cluster.__main__ import main, render_objects
from cluster.config import ConfigError, load_config, parse_config
from core.errors import UserError
from pipeline import config as pconfig
from serving import kubernetes as k8s_serving
from tests.gcs_emulator import emulator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
GKE = EXAMPLES / "cluster-gke.yaml"
UL2 = EXAMPLES / "pipeline-ul2-gke.yaml"
BUCKET = "t5ft-gke"
RAYJOB = "/apis/ray.io/v1/namespaces/t5ft/rayjobs/t5ft-job"
DEPLOYMENTS = "/apis/apps/v1/namespaces/t5ft/deployments"


@pytest.fixture(scope="module")
def gcs():
    """fake-gcs-server with bucket t5ft-gke; os.environ points at it inside the module."""
    with emulator(BUCKET) as (url, env):
        from core import gcs_env

        yield gcs_env.storage_client().bucket(BUCKET), env


def _head_env(cfg) -> dict[str, str]:
    """The T5FT_* environment the rendered head pod gets (the namespace from the downward API)."""
    head = raycluster.raycluster(cfg)["spec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    env[raycluster.ENV_NAMESPACE] = cfg.namespace
    return env


def _model_config(tp: int, pp: int = 1, backend: str = "python") -> str:
    """A config.pbtxt (the JAX engine's backend by default, as the GKE examples convert)."""
    cfg = model_config_pb2.ModelConfig(name="ul2", backend=backend)
    cfg.parameters["tensor_para_size"].string_value = str(tp)
    cfg.parameters["pipeline_para_size"].string_value = str(pp)
    return text_format.MessageToString(cfg)


def _serve_opts(repo: str, **kw) -> argparse.Namespace:
    base = dict(model_repository=repo, model_name="ul2", replicas=1, grpc_port=0, http_port=0,
                metrics_port=0, ready_timeout=60, json=True, namespace="default", image=None,
                kubeconfig=None, service_account=None)
    return argparse.Namespace(**{**base, **kw})


# -- (3) one source for the names ------------------------------------------------------------

def test_pipeline_example_takes_triton_names_from_the_cluster(tmp_path, monkeypatch):
    serve = yaml.safe_load(UL2.read_text())["serve"]
    assert not {"service_account", "namespace", "image"} & set(serve), \
        "these come from the cluster config through the head's environment"
    cfg = load_config(GKE)
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(2))
    for key, value in _head_env(cfg).items():
        monkeypatch.setenv(key, value)
    spec = k8s_serving.triton_spec(_serve_opts(str(tmp_path)))
    rendered_ksas = {o["metadata"]["name"] for o in rbac.access_objects(cfg)
                     if o["kind"] == "ServiceAccount"}
    assert spec.service_account == cfg.service_accounts.triton == "t5ft-triton"
    assert spec.service_account in rendered_ksas
    assert spec.namespace == cfg.namespace


# -- (4) a replica's GPUs fit one node of the pool -------------------------------------------

def test_examples_fit_their_node_pool():
    cfg = load_config(GKE)
    convert = yaml.safe_load(UL2.read_text())["convert"]
    gpus = convert["tensor_parallel"] * convert.get("pipeline_parallel", 1)
    assert gpus <= cfg.triton_node_gpus == 2


def test_config_refuses_gpus_beyond_a_node():
    data = yaml.safe_load(GKE.read_text())
    data["gpu_workers"]["node_gpus"] = 1
    with pytest.raises(ConfigError, match="gpu_workers.gpus 2 exceeds gpu_workers.node_gpus 1"):
        parse_config(data)


def test_serve_refuses_a_replica_larger_than_a_node_before_any_call(api, kubeconfig, tmp_path,
                                                                     monkeypatch):
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(4, 1))
    for key, value in _head_env(load_config(GKE)).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=r"model ul2 \(tensor_para_size 4 x pipeline_para_size "
                                        r"1\) needs 4 GPUs in one pod but a node of the GPU "
                                        r"pool has 2"):
        k8s_serving.KubernetesServers(_serve_opts(str(tmp_path), kubeconfig=str(kubeconfig)))
    assert not api.requests


# -- (5) --config gs:// ----------------------------------------------------------------------

def test_configs_read_from_gcs(gcs, tmp_path):
    bucket, env = gcs
    bucket.blob("cfg/cluster-gke.yaml").upload_from_filename(str(GKE))
    bucket.blob("cfg/pipeline-ul2-gke.yaml").upload_from_filename(str(UL2))
    assert load_config(f"gs://{BUCKET}/cfg/cluster-gke.yaml") == load_config(GKE)
    from_gcs = pconfig.load(f"gs://{BUCKET}/cfg/pipeline-ul2-gke.yaml")
    assert from_gcs == pconfig.load(UL2)
    with pytest.raises(ConfigError, match=f"cluster config gs://{BUCKET}/cfg/nope.yaml does "
                                          f"not exist"):
        load_config(f"gs://{BUCKET}/cfg/nope.yaml")
    with pytest.raises(pconfig.ConfigError, match="does not exist"):
        pconfig.load(f"gs://{BUCKET}/cfg/nope.yaml")
    # The command itself, as a user runs it (the emulator's variables are in os.environ).
    out = subprocess.run([sys.executable, "-m", "cluster", "render", "--config",
                          f"gs://{BUCKET}/cfg/cluster-gke.yaml"], cwd=REPO, text=True,
                         capture_output=True, check=True).stdout
    kinds = [o["kind"] for o in yaml.safe_load_all(out)]
    assert kinds[0] == "Namespace" and "RayCluster" in kinds


# -- (8) up --job waits for the RayJob ---------------------------------------------------------

def test_up_job_waits_until_the_rayjob_ends_with_progress(api, kubeconfig, capsys):
    running = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    api.statuses[RAYJOB] = [running] * 30 + [
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "jobId": "raysubmit_2"}]
    assert main(["up", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--json",
                 "--job", "python -m ray_jobs.pipeline --config gs://b/p.yaml",
                 "--job-deadline", "86400", "--poll", "0.01"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["job_status"] == "SUCCEEDED"  # no timeout of ours cut the wait short
    assert "[0 min] RayJob t5ft-job: deployment Running, job RUNNING" in captured.err
    post = api.calls("POST", "rayjobs")[0].body
    assert post["spec"]["activeDeadlineSeconds"] == 86400
    gets = [r for r in api.calls("GET") if r.path == RAYJOB]
    assert len(gets) == 31


# -- (12) least privilege ----------------------------------------------------------------------

def test_serve_checks_the_service_account_before_creating_anything(api, kubeconfig, tmp_path):
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(1))
    servers = k8s_serving.KubernetesServers(_serve_opts(
        str(tmp_path), kubeconfig=str(kubeconfig), namespace="t5ft",
        service_account="triton", image="example.com/triton:1"))
    with pytest.raises(UserError, match="service account 'triton' not found in namespace "
                                        "'t5ft'"):
        servers.start()
    assert [r.path for r in api.requests] == ["/api/v1/namespaces/t5ft/serviceaccounts/triton"]


# The restricted profile of https://kubernetes.io/docs/concepts/security/pod-security-standards/
# (baseline's rules are included in restricted), one check per documented field.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What in POD (a PodSpec as the API's JSON) the restricted profile forbids."""
    out = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} is set")
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} is {kinds - RESTRICTED_VOLUMES}")
    if pod_sc.get("sysctls"):
        out.append("sysctls are set")
    containers = pod["containers"] + (pod.get("initContainers") or [])
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot") is True or (
                pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities add {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
        if (sc.get("procMount") or "Default") != "Default":
            out.append(f"{name}: procMount")
    return out


def _all_pods(cfg) -> list[dict]:
    spec = raycluster.raycluster(cfg)["spec"]
    job = raycluster.rayjob(cfg, "python x.py")["spec"]
    deployment = triton.deployment(triton.TritonSpec(image="example.com/t5ft/serving:1",
        model_name="ul2", model_repository="gs://b/repo", namespace=cfg.namespace, gpus=2,
        accelerator=cfg.triton_accelerator, service_account=cfg.service_accounts.triton,
        run_as_user=cfg.triton.run_as_user))
    return ([spec["headGroupSpec"]["template"]["spec"]]
            + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
            + [job["submitterPodTemplate"]["spec"], deployment["spec"]["template"]["spec"]])


def test_namespace_pod_security_level_matches_every_rendered_pod():
    data = yaml.safe_load(GKE.read_text())
    data["triton"]["run_as_user"] = 1000  # a non-root serving image
    restricted = parse_config(data)
    assert rbac.pod_security_level(restricted)[0] == "restricted"
    for pod in _all_pods(restricted):
        assert restricted_violations(pod) == []
    labels = rbac.namespace(restricted)["metadata"]["labels"]
    assert {labels[f"pod-security.kubernetes.io/{m}"] for m in ("enforce", "audit", "warn")} \
        == {"restricted"}
    # A root Triton image cannot meet restricted: the namespace says baseline, with why.
    data["triton"]["run_as_user"] = None
    root = parse_config(data)
    assert any(restricted_violations(p) for p in _all_pods(root))
    level, reason = rbac.pod_security_level(root)
    assert level == "baseline" and "runAsNonRoot" in reason
    assert rbac.namespace(root)["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "baseline"


def test_raycluster_token_auth_and_dashboard_only_from_its_namespace(crd_validators):
    cfg = load_config(GKE)
    for obj in (raycluster.raycluster(cfg), raycluster.rayjob(cfg, "python x.py")):
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        assert spec["authOptions"] == {"mode": "token"}
        policy = spec["networkPolicy"]
        assert policy["mode"] == "DenyAllIngress"
        dashboard = [r for r in policy["head"]["ingressRules"]
                     if r["ports"] == [{"protocol": "TCP", "port": 8265}]]
        # The head's namespace (job submission, serve) and the operator's: v1.7.0's policy
        # controller leaves the operator out, and it polls RayJob status through 8265.
        operator = {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": cfg.kuberay_namespace}}}
        assert dashboard == [{"from": [{"podSelector": {}}],
                              "ports": [{"protocol": "TCP", "port": 8265}]},
                             {"from": [operator], "ports": [{"protocol": "TCP", "port": 8265}]}]
        assert not list(crd_validators[obj["kind"]].iter_errors(obj))


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_an_exposed_head_service_is_reachable_through_the_network_policy(crd_validators,
                                                                          service_type):
    # Traffic from outside the cluster matches no pod or namespace selector: without a rule
    # open to every source, the address `up` prints for a LoadBalancer would time out.
    cfg = load_config(GKE)
    cfg = cfg.model_copy(update={"head": cfg.head.model_copy(
        update={"service_type": service_type})})
    obj = raycluster.raycluster(cfg)
    rules = obj["spec"]["networkPolicy"]["head"]["ingressRules"]
    assert {"ports": [{"protocol": "TCP", "port": 8265}]} in rules
    assert all("from" in r for r in rules if r["ports"][0]["port"] != 8265)
    assert not list(crd_validators["RayCluster"].iter_errors(obj))


# -- (13) the Triton Deployment ----------------------------------------------------------------

def _launch_from_head(api, kubeconfig, monkeypatch, cfg, repo: str) -> dict:
    """Serve model ul2 of REPO as the head of CFG's cluster would (its T5FT_* env), against
    the recording API with Triton's service account in place and the Deployment ready at
    once; returns the Deployment serve created."""
    for key, value in _head_env(cfg).items():
        monkeypatch.setenv(key, value)
    api.put("/api/v1/namespaces/t5ft/serviceaccounts/t5ft-triton",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "t5ft-triton"}})
    api.statuses[f"{DEPLOYMENTS}/triton-ul2"] = [
        {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}]
    servers = k8s_serving.KubernetesServers(_serve_opts(repo, kubeconfig=str(kubeconfig)))
    try:
        servers.start()
    finally:
        servers.stop()
    return api.calls("POST", "deployments")[0].body


def test_triton_deployment_recreate_owner_spot_and_local_copy(api, kubeconfig, gcs,
                                                              monkeypatch):
    bucket, _ = gcs
    bucket.blob("repo/ul2/config.pbtxt").upload_from_string(_model_config(2))
    bucket.blob("repo/ul2/1/2-gpu/weights.bin").upload_from_string(b"\0" * (3 << 20))
    cfg = load_config(GKE).model_copy(update={"triton": load_config(GKE).triton.model_copy(
        update={"spot": True})})
    api.put("/apis/ray.io/v1/namespaces/t5ft/rayclusters/t5ft",
            {"apiVersion": "ray.io/v1", "kind": "RayCluster",
             "metadata": {"name": "t5ft", "namespace": "t5ft", "uid": "rc-uid-1"}})
    dep = _launch_from_head(api, kubeconfig, monkeypatch, cfg, f"gs://{BUCKET}/repo")
    svc = api.calls("POST", "services")[0].body
    owner = [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": "t5ft",
              "uid": "rc-uid-1"}]
    assert dep["metadata"]["ownerReferences"] == svc["metadata"]["ownerReferences"] == owner
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    resources = pod["containers"][0]["resources"]
    # 3 MiB of weights + config: ceil(1.1 x size in GiB) + 2 GiB for logs and Triton's files.
    assert resources["requests"]["ephemeral-storage"] == "3Gi"
    import kubernetes_validate

    kubernetes_validate.validate(dep, "1.33", strict=True)
    # The owner of a RayJob's cluster is the RayJob (its head env names it).
    job_head = raycluster.rayjob(cfg, "python x.py")["spec"]["rayClusterSpec"]
    env = {e["name"]: e.get("value") for e in
           job_head["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["T5FT_OWNER_KIND"], env["T5FT_OWNER_NAME"]) == ("RayJob", "t5ft-job")


def test_render_objects_include_the_access_objects_first():
    cfg = load_config(GKE)
    kinds = [o["kind"] for o in render_objects(cfg)]
    assert kinds[0] == "Namespace" and kinds[-3:] == ["RayCluster", "PodMonitoring",
                                                      "PodMonitoring"]


# -- monitoring: PodMonitorings for Managed Prometheus ---------------------------------------

def test_pod_monitorings_render_with_the_cluster_and_validate(crd_validators):
    cfg = load_config(GKE)
    objects = render_objects(cfg)
    monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodMonitoring"}
    assert set(monitors) == {"t5ft-ray", "t5ft-triton"}
    for obj in monitors.values():
        assert obj["apiVersion"] == "monitoring.googleapis.com/v1"
        assert obj["metadata"]["namespace"] == "t5ft"
        assert not list(crd_validators["PodMonitoring"].iter_errors(obj))
    # Each selects what it scrapes: Ray pods of this cluster on 8080, Triton pods on `metrics`.
    head = raycluster.raycluster(cfg)["spec"]["headGroupSpec"]["template"]
    ray_sel = monitors["t5ft-ray"]["spec"]["selector"]["matchLabels"]
    assert ray_sel.items() <= head["metadata"]["labels"].items()
    assert monitors["t5ft-ray"]["spec"]["endpoints"][0]["port"] == 8080
    dep = triton.deployment(triton.TritonSpec(image="example.com/t5ft/serving:1", model_name="ul2", model_repository="gs://b/r",
                                              namespace="t5ft"))
    tri_sel = monitors["t5ft-triton"]["spec"]["selector"]["matchLabels"]
    assert tri_sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"]
             for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports[monitors["t5ft-triton"]["spec"]["endpoints"][0]["port"]] == 8002
    # The vendored schema is strict: a misspelt key fails.
    bad = {**monitors["t5ft-ray"], "spec": {**monitors["t5ft-ray"]["spec"], "selectr": {}}}
    assert list(crd_validators["PodMonitoring"].iter_errors(bad))
    data = yaml.safe_load(GKE.read_text())
    data["managed_prometheus"] = False
    assert not [o for o in render_objects(parse_config(data)) if o["kind"] == "PodMonitoring"]


def test_up_applies_and_down_deletes_the_pod_monitorings(api, kubeconfig, capsys):
    rc = "/apis/ray.io/v1/namespaces/t5ft/rayclusters/t5ft"
    api.statuses[rc] = [{"state": "ready", "conditions": [
        {"type": "HeadPodReady", "status": "True"},
        {"type": "RayClusterProvisioned", "status": "True"}]}]
    argv = ["--config", str(GKE), "--kubeconfig", str(kubeconfig), "--poll", "0.01"]
    assert main(["up", *argv]) == 0
    pm = "/apis/monitoring.googleapis.com/v1/namespaces/t5ft/podmonitorings"
    assert [r.body["metadata"]["name"] for r in api.calls("POST", pm)] == [
        "t5ft-ray", "t5ft-triton"]
    assert main(["down", *argv[:4]]) == 0
    assert {r.path for r in api.calls("DELETE", pm)} == {f"{pm}/t5ft-ray", f"{pm}/t5ft-triton"}


# -- images and backends -----------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("image", "rayproject/ray:2.60.0 py311"),
                                       ("gpu_image", "Ray:2.60.0"),
                                       ("triton", {"image": "nvcr.io//tritonserver:24.12"})])
def test_images_must_be_image_references(key, value):
    data = yaml.safe_load(GKE.read_text())
    data[key] = value
    with pytest.raises(ConfigError, match="is not an image reference"):
        parse_config(data)


def test_triton_image_has_no_default():
    data = yaml.safe_load(GKE.read_text())
    del data["triton"]["image"]
    with pytest.raises(ConfigError, match="missing key triton.image"):
        parse_config(data)


def test_serve_refuses_a_model_for_another_backend(tmp_path, monkeypatch):
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(2, backend="fastertransformer"))
    for key, value in _head_env(load_config(GKE)).items():  # triton.backend: python
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="model ul2 is for Triton's 'fastertransformer' backend "
                                        "but the cluster's Triton image serves 'python'.*"
                                        "--engine jax"):
        k8s_serving.triton_spec(_serve_opts(str(tmp_path)))


def test_serve_needs_an_image_off_the_cluster(tmp_path):
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(1))
    with pytest.raises(UserError, match="no Triton image: pass --image"):
        k8s_serving.triton_spec(_serve_opts(str(tmp_path)))


# -- python -m cluster gcloud ------------------------------------------------------------------

def _commands(path: Path) -> list[str]:
    from cluster import gcloud

    # `retry CMD` retries a binding on IAM's eventual consistency: the command is CMD.
    return [line.removeprefix("retry ")
            for line in gcloud.script(load_config(path), str(path)).splitlines()
            if line and not line.startswith("#")]


@pytest.mark.parametrize("path", [GKE, EXAMPLES / "cluster-small.yaml"], ids=lambda p: p.name)
def test_gcloud_commands_cover_the_config(path):
    cfg = load_config(path)
    lines = _commands(path)
    ns = cfg.namespace
    # Every KSA we render is bound to its Google account, in the config's namespace.
    ksas = [o["metadata"] for o in rbac.access_objects(cfg) if o["kind"] == "ServiceAccount"]
    for meta in ksas:
        gsa = meta["annotations"]["iam.gke.io/gcp-service-account"]
        member = f"serviceAccount:{cfg.project}.svc.id.goog[{ns}/{meta['name']}]"
        assert any(line.startswith(f"gcloud iam service-accounts add-iam-policy-binding {gsa} ")
                   and member in line for line in lines), member
    # One Google account per role: the runner writes the bucket, Triton only reads it.
    runner, reader = cfg.service_accounts.google_service_account, cfg.service_accounts.triton_gsa
    assert runner != reader
    assert any(f"serviceAccount:{runner} --role=roles/storage.objectAdmin" in x for x in lines)
    assert any(f"serviceAccount:{reader} --role=roles/storage.objectViewer" in x for x in lines)
    assert not any(f"serviceAccount:{reader} --role=roles/storage.objectAdmin" in x
                   for x in lines)
    # The namespace comes first, then the dry run and up; KubeRay at the vendored version.
    create = next(i for i, x in enumerate(lines) if x.endswith(f"kubectl create namespace {ns}"))
    dry = next(i for i, x in enumerate(lines) if "--dry-run=server" in x)
    assert create < dry < next(i for i, x in enumerate(lines) if " cluster up " in x)
    assert any("helm upgrade --install kuberay-operator kuberay/kuberay-operator --version=1.7.0"
               in x
               for x in lines)
    assert "v1.7.0" in (REPO / "cluster" / "schemas" / "README.md").read_text()
    # triton.repository: fuse needs the GCS FUSE CSI add-on and Workload Identity on the nodes.
    assert any("clusters create" in x and "--addons=GcsFuseCsiDriver" in x for x in lines)
    pools = [x for x in lines if "node-pools create" in x]
    assert pools and all("--workload-metadata=GKE_METADATA" in x for x in pools)
    # Node pools as the config says: GPUs per node, spot where asked.
    gpu = next(x for x in lines if f"node-pools create {cfg.gpu_workers.group} " in x)
    assert f"count={cfg.gpu_workers.gpus_per_node}," in gpu
    assert ("--spot" in gpu) == cfg.gpu_workers.spot
    assert "--workload-pool=" in next(x for x in lines if "clusters create" in x)


def test_gcloud_builds_the_images_the_config_names():
    cfg = load_config(GKE)
    build = next(x for x in _commands(GKE) if x.startswith("gcloud builds submit"))
    subs = dict(kv.split("=", 1) for kv in
                build.split("--substitutions=")[1].split()[0].split(","))
    cloudbuild = yaml.safe_load((REPO / "docker" / "cloudbuild.yaml").read_text())
    built = set()
    for image in cloudbuild["images"]:
        for key, value in subs.items():
            image = image.replace("${" + key + "}", value)
        built.add(image)
    assert built == {cfg.image, cfg.gpu_image, cfg.triton.image}


def test_gcloud_cli_and_its_errors(tmp_path, capsys):
    assert main(["gcloud", "--config", str(GKE)]) == 0
    assert "kubectl create namespace t5ft" in capsys.readouterr().out
    # The summary counts the steps' commands (a heredoc writing a file is one).
    from cluster import gcloud

    assert main(["gcloud", "--config", str(GKE), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    steps = gcloud.steps(load_config(GKE), str(GKE))
    assert summary == {"commands": sum(len(c) for _, c in steps), "namespace": "t5ft"}
    data = yaml.safe_load(GKE.read_text())
    del data["gpu_workers"]["machine_type"]
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="gpu_workers.machine_type is needed"):
        main(["gcloud", "--config", str(bad)])


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("key,value,problem", [
    ("triton", "localhost:5000/t5ft/serving", "no :TAG"),  # the port is no tag
    ("triton", "us-central1-docker.pkg.dev/p/t5ft/serving", "no :TAG"),
    ("image", f"us-central1-docker.pkg.dev/p/t5ft/ray:2.60.0-py311@{DIGEST}", "a digest")])
def test_gcloud_needs_a_tag_on_the_images_it_builds(tmp_path, key, value, problem):
    data = yaml.safe_load(GKE.read_text())
    if key == "triton":
        data["triton"]["image"] = value
    else:
        data[key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    named = "triton.image" if key == "triton" else "config.image"
    # A cluster may run such an image (render takes it as it is); only a build needs the tag.
    assert main(["render", "--config", str(path), "--json"]) == 0
    with pytest.raises(UserError, match=rf"^{named} '{value}' has {problem}: `python -m "
                                        r"cluster gcloud` builds it and pushes it under a tag"):
        main(["gcloud", "--config", str(path)])


def test_split_image_by_the_reference_grammar():
    from cluster.config import split_image

    assert split_image("localhost:5000/t5ft/serving:0.1") == ("localhost:5000/t5ft/serving",
                                                             "0.1", None)
    assert split_image(f"ray@{DIGEST}") == ("ray", None, DIGEST)
    with pytest.raises(ValueError, match="not an image reference"):
        split_image("Ray:2.60.0")


# -- the repository through the Cloud Storage FUSE CSI driver (triton.repository: fuse) -------

def test_triton_repository_fuse_mounts_the_bucket_read_only(api, kubeconfig, gcs, monkeypatch):
    bucket, _ = gcs
    bucket.blob("fuse/ul2/config.pbtxt").upload_from_string(_model_config(2))
    data = yaml.safe_load(GKE.read_text())
    data["triton"]["repository"] = "fuse"
    dep = _launch_from_head(api, kubeconfig, monkeypatch, parse_config(data),
                            f"gs://{BUCKET}/fuse")
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "gke-gcsfuse/volumes": "true", "gke-gcsfuse/cpu-limit": "0",
        "gke-gcsfuse/memory-limit": "0", "gke-gcsfuse/ephemeral-storage-limit": "0"}
    pod = template["spec"]
    volume = next(v for v in pod["volumes"] if "csi" in v)
    assert volume["csi"] == {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
                             "volumeAttributes": {"bucketName": BUCKET,
                                                  "mountOptions": "implicit-dirs,only-dir=fuse"}}
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": "/model-repository",
                     "readOnly": True}
    assert "--model-repository=/model-repository" in container["args"]
    # Read in place: no disk requested for a local copy.
    assert "ephemeral-storage" not in container["resources"]["requests"]
    assert pod["serviceAccountName"] == "t5ft-triton"  # objectViewer through Workload Identity
    import kubernetes_validate

    kubernetes_validate.validate(dep, "1.33", strict=True)
    assert restricted_violations(pod) == []  # a csi volume is allowed under restricted


def test_triton_repository_fuse_needs_a_bucket(tmp_path, monkeypatch):
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(1))
    monkeypatch.setenv(raycluster.ENV_TRITON_REPOSITORY, "fuse")
    with pytest.raises(UserError, match="triton.repository is fuse but the model repository"):
        k8s_serving.triton_spec(_serve_opts(str(tmp_path), image="example.com/t5ft/serving:1"))
    with pytest.raises(ConfigError, match="triton.repository 'nfs' is not one of gcs, fuse"):
        data = yaml.safe_load(GKE.read_text())
        data["triton"]["repository"] = "nfs"
        parse_config(data)


# -- (9) the stop grace: RAY_JOB_STOP_WAIT_TIME_S --------------------------------------------

def test_every_ray_container_and_the_rayjob_get_the_stop_grace(crd_validators):
    cfg = load_config(GKE)
    grace = str(raycluster.JOB_STOP_WAIT_S)
    job = raycluster.rayjob(cfg, "python x.py", {"env_vars": {"A": "1"}})
    for obj in (raycluster.raycluster(cfg), job):
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        for template in [spec["headGroupSpec"]["template"]] + [
                g["template"] for g in spec["workerGroupSpecs"]]:
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            assert env["RAY_JOB_STOP_WAIT_TIME_S"] == grace
        assert not list(crd_validators[obj["kind"]].iter_errors(obj))
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env == {"env_vars": {"A": "1", "RAY_JOB_STOP_WAIT_TIME_S": grace}}
    # A value the user gives wins.
    assert raycluster.job_runtime_env({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "9"}}) == {
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "9"}}


def test_serve_teardown_fits_in_the_stop_grace(api, kubeconfig, tmp_path):
    (tmp_path / "ul2").mkdir()
    (tmp_path / "ul2" / "config.pbtxt").write_text(_model_config(1))
    servers = k8s_serving.KubernetesServers(_serve_opts(
        str(tmp_path), image="example.com/t5ft/serving:1", kubeconfig=str(kubeconfig)))
    bound = k8s_serving.stop_seconds_bound(servers.kube)
    # 3 calls in flight (6 attempts of 10 s + 15.5 s of backoff) + 2 DELETEs (3 x 10 s + 1.5 s)
    assert bound == 3 * (6 * 10 + 15.5) + 2 * (3 * 10 + 1.5)
    assert bound < raycluster.JOB_STOP_WAIT_S
    # The in-flight count holds because serve looks at the stop event before each object it
    # creates and before each poll: stopped before launch, it creates nothing.
    servers.cancel.set()
    with pytest.raises(UserError, match="stopped before triton-ul2 was launched"):
        servers.start()
    assert not api.calls("POST") and not api.calls("DELETE")
    assert len(api.calls()) <= k8s_serving.IN_FLIGHT_CALLS


# -- the KubeRay token Secret ------------------------------------------------------------------

def test_auth_secret_is_named_as_the_kuberay_operator_names_it(api, kubeconfig, capsys):
    # ray-project/kuberay@v1.7.0 utils.CheckName: the last 50 characters, no leading digit.
    assert raycluster.auth_secret("t5ft") == "t5ft"
    assert raycluster.auth_secret("7b") == "rb"
    assert raycluster.auth_secret("a" * 10 + "b" * 50) == "b" * 50
    api.statuses["/apis/ray.io/v1/namespaces/t5ft/rayclusters/t5ft"] = [
        {"state": "ready", "conditions": [{"type": "HeadPodReady", "status": "True"},
                                          {"type": "RayClusterProvisioned", "status": "True"}]}]
    assert main(["up", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--poll",
                 "0.01"]) == 0
    err = capsys.readouterr().err
    assert ("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(kubectl -n t5ft get secret t5ft "
            "-o jsonpath='{.data.auth_token}' | base64 -d)") in err


def test_pipeline_example_reads_and_writes_the_cluster_bucket_as_the_guide_lays_it_out():
    bucket = load_config(GKE).bucket
    pipe = yaml.safe_load(UL2.read_text())
    convert = pipe["convert"]
    # docs/gke.md section 2 copies the checkpoint, config.gin and spiece.model to $BUCKET/ckpt/.
    assert convert["src"] == f"{bucket}/ckpt/checkpoint_2650000"
    assert convert["vocab"] == f"{bucket}/ckpt/spiece.model"
    assert convert["dst"] == f"{bucket}/repo" and pipe["output"].startswith(f"{bucket}/")
    guide = (REPO / "docs" / "gke.md").read_text()
    assert "$BUCKET/ckpt/checkpoint_2650000" in guide and "export BUCKET=gs://$PROJECT-t5ft" \
        in guide and bucket == "gs://my-gcp-project-t5ft"
