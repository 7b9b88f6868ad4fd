"""`python -m cluster doctor`: one test per assumption, each against objects that break it
(the recording Kubernetes API of conftest.py, and a recording Google API for the rest)."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials

from cluster import doctor, gcloud, iam
from cluster.__main__ import main
from cluster.config import load_config
from core.errors import UserError
from tests.cluster.conftest import CRD_PATH, OPERATOR, operator_deployment

REPO = Path(__file__).resolve().parents[2]
GKE = REPO / "examples" / "cluster-gke.yaml"
CFG = load_config(GKE)
RUNNER = CFG.service_accounts.google_service_account
TRITON = CFG.service_accounts.triton_gsa
POOLS = f"/v1/projects/{CFG.project}/locations/{CFG.zone}/clusters/{CFG.name}/nodePools"
BUCKET_IAM = "/storage/v1/b/my-gcp-project-t5ft/iam"


class FakeGoogle:
    """Answers GET/POST by path from `routes` (path -> (status, JSON)); 404 otherwise."""

    def __init__(self, routes: dict[str, tuple[int, dict]]):
        self.routes = routes
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                server.paths.append(path)
                status, body = server.routes.get(path, (404, {"error": {"code": 404}}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def apis(self) -> doctor.GoogleApis:
        return doctor.GoogleApis(AnonymousCredentials(),
                                 {name: self.url for name in doctor.ENDPOINTS})


def _healthy() -> dict[str, tuple[int, dict]]:
    """A project set up by the setup script: every Google-side assumption holds."""
    pool = {"name": "gpu", "autoscaling": {"enabled": True,
                                           "maxNodeCount": gcloud.gpu_pool_nodes(CFG)["nodes"]},
            "config": {"accelerators": [{"acceleratorType": "nvidia-a100-80gb",
                                         "acceleratorCount": "2"}],
                       "workloadMetadataConfig": {"mode": "GKE_METADATA"}}}
    bindings = [{"role": role, "members": [f"serviceAccount:{gsa}"]}
                for gsa, roles in iam.bucket_roles(RUNNER, TRITON).items() for role in roles]
    routes = {POOLS: (200, {"nodePools": [{"name": "convert", "config": {}}, pool]}),
              BUCKET_IAM: (200, {"bindings": bindings}),
              f"/v1/projects/{CFG.project}:getIamPolicy": (200, {"bindings": []})}
    for role, permissions in iam.ROLE_PERMISSIONS.items():
        routes[f"/v1/{role}"] = (200, {"name": role, "includedPermissions": sorted(permissions)})
    for ksa, gsa in {CFG.service_accounts.ray: RUNNER, CFG.service_accounts.triton: TRITON}.items():
        routes[f"/v1/projects/{CFG.project}/serviceAccounts/{gsa}:getIamPolicy"] = (200, {
            "bindings": [{"role": "roles/iam.workloadIdentityUser", "members": [
                f"serviceAccount:{CFG.project}.svc.id.goog[{CFG.namespace}/{ksa}]"]}]})
    base = f"/v1/projects/{CFG.project}/locations/us-central1/repositories/t5ft/packages"
    for package, tag in (("ray", "2.60.0-py311"), ("ray", "2.60.0-py311-gpu"),
                         ("serving", "0.1.0")):
        routes[f"{base}/{package}/tags/{tag}"] = (200, {"name": tag})
    return routes


@pytest.fixture
def google():
    fake = FakeGoogle(_healthy())
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def _kube(kubeconfig):
    from cluster.kubeapi import Kube, new_api_client

    return Kube(new_api_client(str(kubeconfig)), retries=0)


def _failures(api, kubeconfig, google) -> dict[str, list[str]]:
    report = doctor.run(CFG, _kube(kubeconfig), google.apis())
    return {k: v for k, v in report.failures.items() if v}


def test_a_project_set_up_by_the_script_passes_every_check(api, kubeconfig, google):
    report = doctor.run(CFG, _kube(kubeconfig), google.apis())
    assert report.ok and set(report.failures) == set(doctor.KUBE_CHECKS) | set(
        doctor.GOOGLE_CHECKS) and not report.skipped
    assert POOLS in google.paths and BUCKET_IAM in google.paths


def test_operator_missing(api, kubeconfig, google):
    del api.objects[OPERATOR]
    assert _failures(api, kubeconfig, google)["operator"][0].startswith(
        "no KubeRay operator (Deployment labelled app.kubernetes.io/name=kuberay-operator) in "
        "namespace 'kuberay-system'")


def test_operator_version_and_its_gates(api, kubeconfig, google):
    from cluster import kuberay

    # Installed with the chart's own values: the network policy gate is off.
    api.put(OPERATOR, operator_deployment(kuberay.chart_values(), "quay.io/kuberay/operator:v1.6.1"))
    found = _failures(api, kubeconfig, google)["operator"]
    assert "the operator runs 'quay.io/kuberay/operator:v1.6.1', not v1.7.0" in found[0]
    assert found[1].startswith("the operator's feature gate RayClusterNetworkPolicy is off, "
                               "but our RayCluster spec.networkPolicy needs it")


def test_operator_not_available(api, kubeconfig, google):
    down = copy.deepcopy(api.objects[OPERATOR])
    down["status"] = {"replicas": 1, "unavailableReplicas": 1}
    api.put(OPERATOR, down)
    assert _failures(api, kubeconfig, google)["operator"] == [
        "the KubeRay operator in 'kuberay-system' has no available replica (kubectl -n "
        "kuberay-system describe deployment kuberay-operator): nothing would reconcile our "
        "objects"]


def test_podmonitoring_crd_missing(api, kubeconfig, google):
    del api.objects[f"{CRD_PATH}/podmonitorings.monitoring.googleapis.com"]
    assert _failures(api, kubeconfig, google)["crds"][0].startswith(
        "CRD podmonitorings.monitoring.googleapis.com is not installed: enable Managed Prometheus")
    off = CFG.model_copy(update={"managed_prometheus": False})
    assert doctor.check_crds(off, _kube(kubeconfig)) == []


def test_crds_missing_or_too_old(api, kubeconfig, google):
    del api.objects[f"{CRD_PATH}/rayjobs.ray.io"]
    old = copy.deepcopy(api.objects[f"{CRD_PATH}/rayclusters.ray.io"])
    v1 = next(v for v in old["spec"]["versions"] if v["name"] == "v1")
    del v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["networkPolicy"]
    api.put(f"{CRD_PATH}/rayclusters.ray.io", old)
    found = _failures(api, kubeconfig, google)["crds"]
    assert found == ["CRD rayclusters.ray.io does not know spec.networkPolicy (the API server "
                     "would drop them): install the CRDs of KubeRay 1.7.0",
                     "CRD rayjobs.ray.io is not installed: the KubeRay chart installs it"]


def test_namespace_enforces_a_stricter_pod_security_level(api, kubeconfig, google):
    cfg = CFG.model_copy(update={"triton": CFG.triton.model_copy(update={"run_as_user": None})})
    api.put("/api/v1/namespaces/t5ft", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "t5ft", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    found = doctor.check_namespace(cfg, _kube(kubeconfig))
    assert found and "enforces Pod Security 'restricted', but our pods meet 'baseline'" in found[0]
    assert doctor.check_namespace(CFG, _kube(kubeconfig)) == []


def test_service_account_without_its_workload_identity_annotation(api, kubeconfig, google):
    api.put("/api/v1/namespaces/t5ft/serviceaccounts/t5ft-triton", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "t5ft-triton"}})
    found = _failures(api, kubeconfig, google)["service_accounts"]
    assert found == [f"service account t5ft/t5ft-triton has iam.gke.io/gcp-service-account=None,"
                     f" not '{TRITON}': its pods would not act as {TRITON} (up patches it)"]


@pytest.mark.parametrize("change,expected", [
    (lambda p: p["config"].update(accelerators=[]),
     "no node pool offers nvidia-a100-80gb: the gpu_workers pods would stay Pending"),
    (lambda p: p["config"]["accelerators"][0].update(acceleratorCount="1"),
     "1 x nvidia-a100-80gb per node, the config needs 2"),
    (lambda p: p["config"].update(workloadMetadataConfig={"mode": "GCE_METADATA"}),
     "no GKE metadata server"),
    (lambda p: p["config"].update(taints=[{"key": "team", "value": "x", "effect": "NO_SCHEDULE"}]),
     "taints our GPU pods do not tolerate: team=x:NO_SCHEDULE"),
    (lambda p: p["autoscaling"].update(maxNodeCount=2),
     "at most 2 nodes, the Ray GPU workers and Triton replicas need 3"),
], ids=["accelerator", "count", "metadata", "taint", "size"])
def test_node_pools(api, kubeconfig, google, change, expected):
    pools = google.routes[POOLS][1]
    change(pools["nodePools"][1])
    found = _failures(api, kubeconfig, google)["node_pools"]
    assert len(found) == 1 and expected in found[0]


def test_triton_on_an_accelerator_without_a_pool(api, kubeconfig, google):
    cfg = CFG.model_copy(update={"triton": CFG.triton.model_copy(
        update={"accelerator": "nvidia-h100-80gb"})})
    assert doctor.check_node_pools(cfg, google.apis()) == [
        "no node pool offers nvidia-h100-80gb: the triton pods would stay Pending"]


def test_bucket_iam_triton_without_buckets_get(api, kubeconfig, google):
    # objectViewer alone: Triton's IsDirectory (GetBucketMetadata) would fail.
    google.routes[BUCKET_IAM] = (200, {"bindings": [
        {"role": "roles/storage.objectAdmin", "members": [f"serviceAccount:{RUNNER}"]},
        {"role": "roles/storage.objectViewer", "members": [f"serviceAccount:{TRITON}"]}]})
    found = _failures(api, kubeconfig, google)["bucket_iam"]
    assert found == [f"{TRITON} lacks storage.buckets.get on gs://my-gcp-project-t5ft, which "
                     f"triton needs for GetBucketMetadata (IsDirectory: does the bucket exist) "
                     f"(roles/storage.objectViewer; grant roles/storage.objectViewer + "
                     f"roles/storage.legacyBucketReader)"]


def test_bucket_iam_granted_at_project_level_counts(api, kubeconfig, google):
    google.routes[BUCKET_IAM] = (200, {"bindings": []})
    google.routes[f"/v1/projects/{CFG.project}:getIamPolicy"] = (200, {"bindings": [
        {"role": "roles/storage.objectAdmin", "members": [f"serviceAccount:{RUNNER}"]},
        {"role": "roles/storage.legacyBucketReader", "members": [f"serviceAccount:{TRITON}"]},
        {"role": "roles/storage.objectViewer", "members": [f"serviceAccount:{TRITON}"]}]})
    assert "bucket_iam" not in _failures(api, kubeconfig, google)


def test_bucket_iam_unreadable_project_policy_is_named(api, kubeconfig, google):
    # Roles held on the project only, and a project policy we may not read: the line says the
    # project's roles were not counted instead of calling them missing without a word.
    google.routes[BUCKET_IAM] = (200, {"bindings": []})
    google.routes[f"/v1/projects/{CFG.project}:getIamPolicy"] = (403, {"error": {
        "code": 403, "status": "PERMISSION_DENIED"}})
    found = _failures(api, kubeconfig, google)["bucket_iam"]
    assert found and all(line.endswith("the project's IAM policy could not be read (HTTP "
                                       "403), so roles granted there are not counted)")
                         for line in found), found


def test_workload_identity_binding_missing(api, kubeconfig, google):
    google.routes[f"/v1/projects/{CFG.project}/serviceAccounts/{RUNNER}:getIamPolicy"] = (
        200, {"bindings": []})
    found = _failures(api, kubeconfig, google)["workload_identity"]
    assert found == [f"serviceAccount:{CFG.project}.svc.id.goog[t5ft/t5ft-ray] may not act as "
                     f"{RUNNER} (roles/iam.workloadIdentityUser missing): its pods would reach "
                     f"Google as the node, not as {RUNNER}"]


def test_image_not_built(api, kubeconfig, google):
    base = f"/v1/projects/{CFG.project}/locations/us-central1/repositories/t5ft/packages"
    del google.routes[f"{base}/serving/tags/0.1.0"]
    found = _failures(api, kubeconfig, google)["images"]
    assert found == [f"triton.image {CFG.triton.image} is not in Artifact Registry (HTTP 404): "
                     f"build it (the setup script's gcloud builds submit)"]


def test_cli_doctor_and_up_run_the_checks_first(api, kubeconfig, capsys):
    # Without Google credentials (this machine) the Google checks are skipped, said on stderr.
    assert main(["doctor", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["skipped"] == list(doctor.GOOGLE_CHECKS)
    del api.objects[OPERATOR]
    with pytest.raises(UserError, match=r"^doctor: 1 assumption\(s\) do not hold: operator: "):
        main(["doctor", "--config", str(GKE), "--kubeconfig", str(kubeconfig)])
    with pytest.raises(UserError, match=r"^up: nothing created, 1 assumption\(s\) do not hold"):
        main(["up", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--timeout", "0"])
    assert not api.calls("POST")  # nothing was created


def test_up_repairs_a_service_accounts_annotation_instead_of_stopping(api, kubeconfig, capsys):
    ksa = "/api/v1/namespaces/t5ft/serviceaccounts/t5ft-triton"
    api.put(ksa, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "t5ft-triton"}})
    api.statuses["/apis/ray.io/v1/namespaces/t5ft/rayclusters/t5ft"] = [{"state": "ready"}]
    assert main(["up", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--poll", "0.01",
                 "--timeout", "5"]) == 0
    assert "service_accounts: service account t5ft/t5ft-triton has" in capsys.readouterr().err
    assert api.objects[ksa]["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": TRITON}
