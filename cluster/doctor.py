"""`python -m cluster doctor`: check, before anything is created, what the tests here cannot.

The fake API server and the GCS emulator enforce no feature gate and no IAM; the real operator,
IAM and Triton do. Each check reads the live project or cluster and returns one line per
assumption that does not hold (empty: it holds):

Kubernetes (the cluster `up` would write to):
- operator: the KubeRay operator's Deployment exists in config.kuberay_namespace, is available,
  runs the
  version whose CRDs we validate against, and its --feature-gates (over features.go's
  defaults) enable every gate our objects need (cluster/kuberay.py).
- crds: rayclusters.ray.io and rayjobs.ray.io serve v1 and know every field of our specs
  (an older CRD would prune them silently); PodMonitoring's CRD is there when we render them.
- namespace: its Pod Security enforce level is no stricter than what our pods meet.
- service_accounts: each existing Kubernetes service account names its Google account in
  iam.gke.io/gcp-service-account.
Google Cloud (when credentials are found):
- node_pools: a pool offers the GPU group's accelerator and count, with Workload Identity's
  metadata server, room for the pool's size, and no taint our pods do not tolerate.
- bucket_iam: each Google account holds the permissions of cluster/iam.py's table on the
  bucket (the bucket's and the project's IAM policies, the roles' permissions).
- workload_identity: each Google account lets its Kubernetes service account act as it.
- images: the config's Artifact Registry images exist (tag lookup).

Google REST calls (v1 APIs; the fields read are the documented ones): GKE
projects.locations.clusters.nodePools.list (config.accelerators, config.taints,
config.workloadMetadataConfig.mode, config.spot, autoscaling.maxNodeCount); Cloud Storage
buckets.getIamPolicy; Resource Manager projects.getIamPolicy; IAM roles.get
(includedPermissions) and projects.serviceAccounts.getIamPolicy; Artifact Registry
projects.locations.repositories.packages.tags.get.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from urllib.parse import quote

from cluster import gcloud, iam, kuberay, pods, raycluster, rbac
from cluster.config import (
    KUBERAY_CHART_VERSION,
    WORKLOAD_IDENTITY_ANNOTATION,
    ClusterConfig,
    split_image,
)
from cluster.kubeapi import Kube

OPERATOR_LABEL = "app.kubernetes.io/name=kuberay-operator"  # the chart's kuberay-operator.labels
CRDS = {"RayCluster": "rayclusters.ray.io", "RayJob": "rayjobs.ray.io"}
PODMONITORING = "podmonitorings.monitoring.googleapis.com"  # GKE's Managed Prometheus
_PSA_ORDER = ["privileged", "baseline", "restricted"]
_AR_IMAGE = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/"
                       r"(?P<repo>[^/]+)/(?P<package>.+)$")

ENDPOINTS = {
    "container": "https://container.googleapis.com",
    "storage": "https://storage.googleapis.com",
    "iam": "https://iam.googleapis.com",
    "resourcemanager": "https://cloudresourcemanager.googleapis.com",
    "artifactregistry": "https://artifactregistry.googleapis.com",
}


class GoogleApis:
    """The few Google REST calls the doctor makes, through google-auth's AuthorizedSession.

    ENDPOINTS may be replaced (a test's fake server); answers are (status, JSON or None).
    """

    def __init__(self, credentials, endpoints: dict[str, str] | None = None,
                 timeout: float = 30):
        from google.auth.transport.requests import AuthorizedSession

        self.session = AuthorizedSession(credentials)
        self.endpoints = {**ENDPOINTS, **(endpoints or {})}
        self.timeout = timeout

    @classmethod
    def from_environment(cls) -> GoogleApis | None:
        """Application-default credentials (gcloud auth application-default login), or None."""
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, _ = google.auth.default(
                scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except DefaultCredentialsError:
            return None
        return cls(credentials)

    def call(self, method: str, service: str, path: str) -> tuple[int, dict | None]:
        """METHOD the SERVICE's PATH; (status, body)."""
        response = self.session.request(method, self.endpoints[service] + path,
                                        timeout=self.timeout)
        try:
            body = response.json()
        except ValueError:
            body = None
        return response.status_code, body


@dataclasses.dataclass
class Report:
    """The doctor's findings: check name -> failed assumptions (lines); skipped checks."""

    failures: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check that ran held."""
        return not any(self.failures.values())

    def lines(self, skip: frozenset[str] = frozenset()) -> list[str]:
        """One line per failed assumption, prefixed with its check (checks in SKIP left out)."""
        return [f"{name}: {line}" for name, found in self.failures.items() if name not in skip
                for line in found]

    def to_json(self) -> dict:
        """The JSON summary of `doctor --json`."""
        return {"ok": self.ok, "failures": self.lines(), "checked": list(self.failures),
                "skipped": self.skipped}


def our_objects(cfg: ClusterConfig) -> list[dict]:
    """The objects whose fields the operator and its CRDs must accept: `up`'s RayCluster and
    `up --job`'s RayJob."""
    return [raycluster.raycluster(cfg), raycluster.rayjob(cfg, "true")]


# -- Kubernetes ------------------------------------------------------------------------------

def check_operator(cfg: ClusterConfig, kube: Kube) -> list[str]:
    """The operator's Deployment, its version and the feature gates it runs with."""
    found = kube.list("Deployment", cfg.kuberay_namespace, label_selector=OPERATOR_LABEL)
    if not found:
        return [f"no KubeRay operator (Deployment labelled {OPERATOR_LABEL}) in namespace "
                f"{cfg.kuberay_namespace!r}: install it with the setup script's helm command "
                f"(python -m cluster gcloud; config.kuberay_namespace names where it runs)"]
    out = []
    if not int((found[0].get("status") or {}).get("availableReplicas") or 0):
        out.append(f"the KubeRay operator in {cfg.kuberay_namespace!r} has no available replica "
                   f"(kubectl -n {cfg.kuberay_namespace} describe deployment "
                   f"{found[0]['metadata']['name']}): nothing would reconcile our objects")
    containers = found[0]["spec"]["template"]["spec"]["containers"]
    container = next((c for c in containers if "kuberay" in c.get("image", "")), containers[0])
    tag = container.get("image", "").rsplit(":", 1)[-1]
    if tag.lstrip("v") != KUBERAY_CHART_VERSION:
        out.append(f"the operator runs {container.get('image')!r}, not v{KUBERAY_CHART_VERSION} "
                   f"(whose CRDs and validation our objects are checked against): helm upgrade "
                   f"kuberay-operator kuberay/kuberay-operator --version={KUBERAY_CHART_VERSION}")
    gates = kuberay.effective_gates(list(container.get("args") or [])
                                    + list(container.get("command") or []))
    for gate, field in sorted(kuberay.required_gates(our_objects(cfg)).items()):
        if not gates.get(gate, False):
            out.append(f"the operator's feature gate {gate} is off, but our {field} needs it "
                       f"(the operator would refuse the spec and create no pod): reinstall "
                       f"with the setup script's {gcloud.KUBERAY_VALUES}")
    return out


def _properties(schema: dict, key: str) -> dict:
    return ((schema.get("properties") or {}).get(key) or {})


def _unknown_fields(schema: dict, spec: dict, where: str) -> list[str]:
    """Keys of SPEC (and of a RayJob's rayClusterSpec) that SCHEMA does not list."""
    known = schema.get("properties") or {}
    out = [f"{where}.{k}" for k in spec if k not in known]
    if isinstance(spec.get("rayClusterSpec"), dict) and "rayClusterSpec" in known:
        out += _unknown_fields(known["rayClusterSpec"], spec["rayClusterSpec"],
                               f"{where}.rayClusterSpec")
    return out


def check_crds(cfg: ClusterConfig, kube: Kube) -> list[str]:
    """The CRDs serve ray.io/v1 and know every top-level field of our specs."""
    out = []
    objects = {o["kind"]: o for o in our_objects(cfg)}
    if cfg.managed_prometheus and kube.get("CustomResourceDefinition", PODMONITORING) is None:
        out.append(f"CRD {PODMONITORING} is not installed: enable Managed Prometheus (gcloud "
                   f"container clusters update {cfg.name} --enable-managed-prometheus) or set "
                   f"managed_prometheus: false")
    for kind, name in CRDS.items():
        crd = kube.get("CustomResourceDefinition", name)
        if crd is None:
            out.append(f"CRD {name} is not installed: the KubeRay chart installs it")
            continue
        version = next((v for v in crd["spec"].get("versions", []) if v.get("name") == "v1"),
                       None)
        if version is None or not version.get("served"):
            out.append(f"CRD {name} does not serve v1")
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        unknown = _unknown_fields(_properties(schema, "spec"), objects[kind]["spec"], "spec")
        if unknown:
            out.append(f"CRD {name} does not know {', '.join(unknown)} (the API "
                       f"server would drop them): install the CRDs of KubeRay "
                       f"{KUBERAY_CHART_VERSION}")
    return out


def check_namespace(cfg: ClusterConfig, kube: Kube) -> list[str]:
    """The namespace's Pod Security enforce level admits our pods."""
    ns = kube.get("Namespace", cfg.namespace)
    if ns is None:
        if cfg.create_namespace:
            return []
        return [f"namespace {cfg.namespace!r} does not exist and create_namespace is false"]
    level, why = rbac.pod_security_level(cfg)
    labels = (ns.get("metadata") or {}).get("labels") or {}
    enforce = labels.get("pod-security.kubernetes.io/enforce")
    if enforce in _PSA_ORDER and _PSA_ORDER.index(enforce) > _PSA_ORDER.index(level):
        return [f"namespace {cfg.namespace!r} enforces Pod Security {enforce!r}, but our pods "
                f"meet {level!r} ({why}): kubectl label ns {cfg.namespace} --overwrite "
                f"pod-security.kubernetes.io/enforce={level}"]
    return []


def check_service_accounts(cfg: ClusterConfig, kube: Kube) -> list[str]:
    """Existing Kubernetes service accounts carry their Google account's annotation."""
    out = []
    for ksa, gsa in rbac.google_service_accounts(cfg).items():
        sa = kube.get("ServiceAccount", ksa, cfg.namespace)
        if sa is None:
            continue  # `up` creates it with the annotation
        have = ((sa.get("metadata") or {}).get("annotations") or {}).get(
            WORKLOAD_IDENTITY_ANNOTATION)
        if have != gsa:
            out.append(f"service account {cfg.namespace}/{ksa} has {WORKLOAD_IDENTITY_ANNOTATION}"
                       f"={have!r}, not {gsa!r}: its pods would not act as {gsa} (up patches it)")
    return out


# -- Google Cloud ----------------------------------------------------------------------------

def _tolerated(taint: dict, tolerations: list) -> bool:
    effect = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute",
              "PREFER_NO_SCHEDULE": "PreferNoSchedule"}.get(taint.get("effect"), "")
    if effect == "PreferNoSchedule":
        return True
    return any(t.key == taint.get("key") and (t.operator == "Exists" or t.value ==
                                              taint.get("value"))
               and t.effect in (None, effect) for t in tolerations)


def _pool_needs(cfg: ClusterConfig) -> list[tuple[str, str, int, bool, int]]:
    """(who, accelerator, GPUs per node, spot, nodes) each GPU consumer needs of a pool: the
    GPU group's pool holds Triton too (gcloud.gpu_pool_nodes); a Triton accelerator of its
    own needs a pool of its own."""
    needs = []
    g = cfg.gpu_workers
    if g is not None:
        needs.append(("gpu_workers", g.accelerator, g.gpus_per_node, g.spot,
                      gcloud.gpu_pool_nodes(cfg)["nodes"]))
    acc = cfg.triton_accelerator
    if acc and (g is None or acc != g.accelerator):
        needs.append(("triton", acc, cfg.triton.gpus or 1, cfg.triton_spot,
                      cfg.triton.max_replicas))
    return needs


def _pool_problems(pool: dict, accelerator: str, per_node: int, spot: bool,
                   nodes: int) -> list[str]:
    config = pool.get("config") or {}
    problems = []
    count = max(int(a.get("acceleratorCount") or 0) for a in config["accelerators"]
                if a.get("acceleratorType") == accelerator)
    if count < per_node:
        problems.append(f"{count} x {accelerator} per node, the config needs {per_node}")
    if (config.get("workloadMetadataConfig") or {}).get("mode") != "GKE_METADATA":
        problems.append("no GKE metadata server (Workload Identity: "
                        "--workload-metadata=GKE_METADATA)")
    _, tolerations = pods.gpu_scheduling(accelerator, spot)
    bad = [t for t in config.get("taints") or [] if not _tolerated(t, tolerations)]
    if bad:
        problems.append("taints our GPU pods do not tolerate: " + ", ".join(
            f"{t.get('key')}={t.get('value')}:{t.get('effect')}" for t in bad))
    if bool(config.get("spot") or config.get("preemptible")) != spot:
        problems.append(f"spot is {bool(config.get('spot'))}, the config's is {spot}")
    auto = pool.get("autoscaling") or {}
    if auto.get("enabled") and int(auto.get("maxNodeCount") or 0) < nodes:
        problems.append(f"at most {auto.get('maxNodeCount')} nodes, the Ray GPU workers "
                        f"and Triton replicas need {nodes}")
    return problems


def check_node_pools(cfg: ClusterConfig, google: GoogleApis) -> list[str]:
    """For each GPU consumer (the GPU group with Triton, or Triton on an accelerator of its
    own): a node pool with that accelerator and count, Workload Identity, room for its size,
    and only taints our GPU pods tolerate."""
    needs = _pool_needs(cfg)
    if not needs:
        return []
    status, body = google.call(
        "GET", "container", f"/v1/projects/{cfg.project}/locations/{cfg.zone}/clusters/"
                            f"{cfg.name}/nodePools")
    if status != 200:
        return [f"cannot list the node pools of GKE cluster {cfg.name} in {cfg.zone} "
                f"(HTTP {status}): create it with the setup script"]
    out = []
    for who, accelerator, per_node, spot, nodes in needs:
        candidates = [pool for pool in (body or {}).get("nodePools", [])
                      if any(a.get("acceleratorType") == accelerator for a in
                             (pool.get("config") or {}).get("accelerators") or [])]
        if not candidates:
            out.append(f"no node pool offers {accelerator}: the {who} pods would stay Pending"
                       f"{' (the setup script creates it)' if who == 'gpu_workers' else ''}")
            continue
        found = [(pool, _pool_problems(pool, accelerator, per_node, spot, nodes))
                 for pool in candidates]
        if not any(not problems for _, problems in found):
            out += [f"node pool {pool.get('name')}: {'; '.join(problems)}"
                    for pool, problems in found]
    return out


def _policy_roles(policy: dict | None, member: str) -> set[str]:
    return {b["role"] for b in (policy or {}).get("bindings", [])
            if member in (b.get("members") or []) and not b.get("condition")}


def _role_permissions(google: GoogleApis, role: str, cache: dict) -> set[str]:
    if role not in cache:
        # Predefined: roles/X -> /v1/roles/X; custom: projects/P/roles/X -> /v1/projects/P/...
        status, body = google.call("GET", "iam", f"/v1/{role}")
        # Unreadable (no iam.roles.get on a custom role): the documented permissions of a
        # predefined role we know, else none (the line then names the role).
        cache[role] = set((body or {}).get("includedPermissions") or []) if status == 200 \
            else set(iam.ROLE_PERMISSIONS.get(role, ()))
    return cache[role]


def check_bucket_iam(cfg: ClusterConfig, google: GoogleApis) -> list[str]:
    """Each Google account holds its table permissions on the bucket (bucket or project
    policy, unconditional bindings)."""
    bucket = gcloud.bucket_url(cfg).removeprefix("gs://")
    status, bucket_policy = google.call("GET", "storage",
                                        f"/storage/v1/b/{bucket}/iam?optionsRequestedPolicyVersion=3")
    if status != 200:
        return [f"cannot read the IAM policy of gs://{bucket} (HTTP {status}): does it exist, "
                f"and may you read it (storage.buckets.getIamPolicy)?"]
    project_status, project_policy = google.call("POST", "resourcemanager",
                                                 f"/v1/projects/{cfg.project}:getIamPolicy")
    # Roles granted on the project count too; where that policy cannot be read (no
    # resourcemanager.projects.getIamPolicy, or the API off in the credentials' quota
    # project), say so rather than report roles it may hold as missing without a word.
    unread = "" if project_status == 200 else (
        f"; the project's IAM policy could not be read (HTTP {project_status}), so roles "
        f"granted there are not counted")
    cache: dict = {}
    out = []
    accounts = iam.accounts(cfg.service_accounts.google_service_account,
                            cfg.service_accounts.triton_gsa)
    for gsa, who in accounts.items():
        member = f"serviceAccount:{gsa}"
        roles = _policy_roles(bucket_policy, member) | _policy_roles(project_policy, member)
        granted = set().union(*(_role_permissions(google, r, cache) for r in roles)) \
            if roles else set()
        for call in iam.missing(who, granted):
            out.append(f"{gsa} lacks {call.permission} on gs://{bucket}, which {call.account} "
                       f"needs for {call.call} ({', '.join(sorted(roles)) or 'no roles'}; "
                       f"grant {' + '.join(iam.covering_roles(iam.needed(who)))}{unread})")
    return out


def check_workload_identity(cfg: ClusterConfig, google: GoogleApis) -> list[str]:
    """Each Google account lets its Kubernetes service account act as it."""
    out = []
    for ksa, gsa in rbac.google_service_accounts(cfg).items():
        status, policy = google.call(
            "POST", "iam", f"/v1/projects/{cfg.project}/serviceAccounts/{gsa}:getIamPolicy")
        member = f"serviceAccount:{cfg.project}.svc.id.goog[{cfg.namespace}/{ksa}]"
        if status == 404:
            out.append(f"Google service account {gsa} does not exist")
        elif "roles/iam.workloadIdentityUser" not in _policy_roles(policy, member):
            out.append(f"{member} may not act as {gsa} (roles/iam.workloadIdentityUser "
                       f"missing): its pods would reach Google as the node, not as {gsa}")
    return out


def check_images(cfg: ClusterConfig, google: GoogleApis) -> list[str]:
    """The config's Artifact Registry images exist, by tag."""
    out = []
    for key, image in (("image", cfg.image), ("gpu_image", cfg.gpu_image),
                       ("triton.image", cfg.triton.image)):
        repository, tag, digest = split_image(image)
        match = _AR_IMAGE.match(repository)
        if match is None or tag is None or digest is not None:
            continue  # not Artifact Registry, or pinned by digest: nothing to look up by tag
        path = (f"/v1/projects/{match['project']}/locations/{match['location']}/repositories/"
                f"{match['repo']}/packages/{quote(match['package'], safe='')}/tags/{tag}")
        status, _ = google.call("GET", "artifactregistry", path)
        if status != 200:
            out.append(f"{key} {image} is not in Artifact Registry (HTTP {status}): build it "
                       f"(the setup script's gcloud builds submit)")
    return out


# What `up` repairs itself (it patches the service accounts with their annotation): reported
# by `up`, but no reason to stop it.
REPAIRED_BY_UP = frozenset({"service_accounts"})

KUBE_CHECKS: dict[str, Callable[[ClusterConfig, Kube], list[str]]] = {
    "operator": check_operator, "crds": check_crds, "namespace": check_namespace,
    "service_accounts": check_service_accounts}
GOOGLE_CHECKS: dict[str, Callable[[ClusterConfig, GoogleApis], list[str]]] = {
    "node_pools": check_node_pools, "bucket_iam": check_bucket_iam,
    "workload_identity": check_workload_identity, "images": check_images}


def run(cfg: ClusterConfig, kube: Kube, google: GoogleApis | None) -> Report:
    """Every check; Google's are skipped (and listed as such) without GOOGLE."""
    report = Report()
    for name, check in KUBE_CHECKS.items():
        report.failures[name] = check(cfg, kube)
    for name, gcheck in GOOGLE_CHECKS.items():
        if google is None:
            report.skipped.append(name)
        else:
            report.failures[name] = gcheck(cfg, google)
    return report
