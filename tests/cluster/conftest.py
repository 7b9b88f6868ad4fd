"""A recording Kubernetes API server, and the KubeRay CRD schemas.

`FakeKubeAPI` is a real http.server on 127.0.0.1 (in a thread) that answers the REST calls our
client makes the way the API server does: 201 on create, 409 when the name exists, 200 on get
with whatever status the test scripts, merge on patch, 404 for what is not there, and any
status a test injects (503, 403, ...) for a given number of matching requests. Every request
is recorded (method, path, query, content type, JSON body) for the tests to check on the wire.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "cluster" / "schemas"  # KubeRay v1.7.0 and PodMonitoring CRDs (README.md)

PLURALS = {"namespaces", "serviceaccounts", "services", "pods", "events", "deployments",
           "roles", "rolebindings", "rayclusters", "rayjobs", "podmonitorings",
           "customresourcedefinitions"}
OPERATOR = "/apis/apps/v1/namespaces/kuberay-system/deployments/kuberay-operator"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    query: dict
    content_type: str | None
    body: object
    authorization: str | None


def _merge(dst: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386); strategic merge differs only for lists we do not patch."""
    for key, value in patch.items():
        if value is None:
            dst.pop(key, None)
        elif isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


class FakeKubeAPI:
    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.baseline: dict[str, dict] = {}  # what reset() puts back (an installed operator)
        self.requests: list[Recorded] = []
        self.statuses: dict[str, list[dict]] = {}  # path -> successive `status` on GET
        self.faults: list[list] = []  # [method, path regex, status, remaining]
        self.stalls: list[list] = []  # [method, path regex, seconds, remaining]
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw else None

            def _reply(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                url = urlparse(self.path)
                body = self._body()
                # Outside the lock: a stalled request must not hold up the others.
                time.sleep(server.stall_seconds(self.command, url.path))
                with server._lock:
                    server.requests.append(Recorded(
                        self.command, url.path, parse_qs(url.query),
                        self.headers.get("Content-Type"), body,
                        self.headers.get("Authorization")))
                    code, obj = server.answer(self.command, url.path, parse_qs(url.query), body)
                self._reply(code, obj)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    # -- scripting ------------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int, times: int = 1,
             message: str = "") -> None:
        """Answer the next TIMES matching requests with STATUS."""
        self.faults.append([method, path_regex, status, times, message])

    def stall(self, method: str, path_regex: str, seconds: float, times: int = 1) -> None:
        """Answer the next TIMES matching requests only after SECONDS (a slow API server)."""
        self.stalls.append([method, path_regex, seconds, times])

    def put(self, path: str, obj: dict) -> None:
        self.objects[path] = copy.deepcopy(obj)

    def calls(self, method: str | None = None, contains: str = "") -> list[Recorded]:
        return [r for r in self.requests
                if (method is None or r.method == method) and contains in r.path]

    def reset(self) -> None:
        self.objects.clear()
        self.objects.update(self.baseline)
        self.requests.clear()
        self.statuses.clear()
        self.faults.clear()
        self.stalls.clear()
        self._gets.clear()

    # -- the API --------------------------------------------------------------------------

    def stall_seconds(self, method: str, path: str) -> float:
        """How long to hold this request before answering it (see stall)."""
        with self._lock:
            for stall in self.stalls:
                if stall[0] == method and re.search(stall[1], path) and stall[3] > 0:
                    stall[3] -= 1
                    return stall[2]
        return 0.0

    def answer(self, method: str, path: str, query: dict, body) -> tuple[int, dict]:
        for fault in self.faults:
            if fault[0] == method and re.search(fault[1], path) and fault[3] > 0:
                fault[3] -= 1
                reasons = {403: "Forbidden", 409: "AlreadyExists", 401: "Unauthorized"}
                return fault[2], _status(fault[2], reasons.get(fault[2], "InternalError"),
                                         fault[4] or f"injected {fault[2]}")
        last = path.rstrip("/").rsplit("/", 1)[-1]
        is_collection = last in PLURALS
        if method == "POST" and is_collection:
            name = body["metadata"]["name"]
            item = f"{path}/{name}"
            if item in self.objects:
                return 409, _status(409, "AlreadyExists", f'{last} "{name}" already exists')
            obj = copy.deepcopy(body)
            obj["metadata"].update(generation=1, uid=f"uid-{len(self.objects)}",
                                   resourceVersion="1")
            self.objects[item] = obj
            return 201, obj
        if method == "GET" and is_collection:
            selector = dict(part.split("=", 1) for part in
                            (query.get("labelSelector") or [""])[0].split(",") if part)
            items = [copy.deepcopy(o) for p, o in self.objects.items()
                     if p.rsplit("/", 1)[0] == path and all(
                         (o.get("metadata", {}).get("labels") or {}).get(k) == v
                         for k, v in selector.items())]
            return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}
        if path not in self.objects:
            return 404, _status(404, "NotFound", f'"{last}" not found')
        if method == "GET":
            obj = copy.deepcopy(self.objects[path])
            scripted = self.statuses.get(path)
            if scripted:
                n = self._gets.get(path, 0)
                self._gets[path] = n + 1
                obj["status"] = scripted[min(n, len(scripted) - 1)]
            return 200, obj
        if method == "PATCH":
            obj = _merge(self.objects[path], body)
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            return 200, obj
        if method == "DELETE":
            self.objects.pop(path)
            return 200, _status(200, "", "") | {"status": "Success"}
        return 405, _status(405, "MethodNotAllowed", method)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake_api():
    server = FakeKubeAPI()
    yield server
    server.close()


def operator_deployment(values: dict, image: str | None = None) -> dict:
    """The KubeRay operator's Deployment as the v1.7.0 chart renders it with VALUES (labels
    from _helpers.tpl "kuberay-operator.labels", the --feature-gates flag from
    "kuberay.featureGates"): only the fields the doctor reads."""
    from cluster import kuberay

    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "kuberay-operator", "namespace": "kuberay-system",
                         "labels": {"app.kubernetes.io/name": "kuberay-operator",
                                    "app.kubernetes.io/instance": "kuberay-operator"}},
            "spec": {"template": {"spec": {"containers": [{
                "name": "kuberay-operator", "image": image or kuberay.chart_image(),
                "command": ["/manager"],
                "args": [kuberay.feature_gates_arg(values), "--enable-leader-election=true"]}]}}},
            "status": {"replicas": 1, "availableReplicas": 1}}


_CRDS: dict[str, dict] = {}


def vendored_crd(file_name: str) -> dict:
    """The vendored CRD file as the API server returns it (parsed once per session)."""
    if file_name not in _CRDS:
        _CRDS[file_name] = yaml.load((SCHEMAS / file_name).read_text(),
                                     Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return _CRDS[file_name]


def install_kuberay(server: FakeKubeAPI) -> None:
    """What the setup script leaves: the operator (with the script's Helm values), the v1.7.0
    CRDs, and Managed Prometheus' PodMonitoring CRD."""
    from cluster import gcloud
    from cluster.config import load_config

    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    server.objects[OPERATOR] = operator_deployment(gcloud.helm_values(cfg))
    # GKE's Managed Prometheus (the setup script enables it) installs the PodMonitoring CRD.
    for file_name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml",
                      "monitoring.googleapis.com_podmonitorings.yaml"):
        crd = vendored_crd(file_name)
        server.objects[f"{CRD_PATH}/{crd['metadata']['name']}"] = crd


@pytest.fixture(autouse=True)
def _no_google_credentials(monkeypatch, tmp_path):
    """No Google credentials here (as on this machine): doctor skips its Google checks."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud-config"))


@pytest.fixture
def api(fake_api):
    """The module's fake API, emptied for this test, with KubeRay installed."""
    if not fake_api.baseline:
        install_kuberay(fake_api)
        fake_api.baseline = dict(fake_api.objects)
    fake_api.reset()
    return fake_api


@pytest.fixture
def kubeconfig(api, tmp_path) -> Path:
    """A kubeconfig pointing at the fake API with a bearer token."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "fake", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return path


def crd_schema(file_name: str) -> dict:
    """openAPIV3Schema of the CRD's v1 version, as strict as the API server's field validation.

    The x-kubernetes-* extensions are dropped; where an object lists its properties and does
    not preserve unknown fields, other keys are refused (the server would prune or, with
    fieldValidation=Strict, reject them: a misplaced nodeSelector must fail here).
    """
    path = SCHEMAS / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the KubeRay CRDs live in cluster/schemas/")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")

    def strip(node):
        if isinstance(node, dict):
            out = {k: strip(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
            if "properties" in node and "additionalProperties" not in node and not node.get(
                    "x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
            return out
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="session")
def crd_validators() -> dict:
    """kind -> jsonschema validator for RayCluster, RayJob and PodMonitoring."""
    import jsonschema

    out = {}
    for kind, file_name in (("RayCluster", "ray.io_rayclusters.yaml"),
                            ("RayJob", "ray.io_rayjobs.yaml"),
                            ("PodMonitoring", "monitoring.googleapis.com_podmonitorings.yaml")):
        schema = crd_schema(file_name)
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out
