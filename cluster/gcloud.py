"""The gcloud, helm and kubectl commands that prepare a Google Cloud project for a cluster config.

`python -m cluster gcloud --config CLUSTER.yaml` prints them as a shell script, generated from
the same ClusterConfig that `render` and `up` use, so the project and the objects cannot drift:
the namespace, the service account names and the node pools are read from one place.
Facts relied on (docs/gke.md, "Facts we rely on", cites them): Workload Identity Federation for
GKE binds `PROJECT.svc.id.goog[NAMESPACE/KSA]` with roles/iam.workloadIdentityUser; GKE taints
GPU node pools with nvidia.com/gpu and installs the driver with `gpu-driver-version=default`;
the KubeRay chart is pinned to the release whose CRDs and sources are vendored in
cluster/schemas/, installed with the feature gates our objects need (kuberay.py); the bucket
roles come from cluster/iam.py's call table; the nodes and Cloud Build run as accounts of our
own with explicit roles (new organisations give the default compute account none), bound with
retries (IAM is eventually consistent). `teardown_steps` removes what `steps` made.
"""

from __future__ import annotations

import math
import shlex

import yaml

from cluster import iam, kuberay, raycluster, rbac
from cluster.config import (
    KUBERAY_CHART_VERSION,
    ClusterConfig,
    ConfigError,
    WorkerGroup,
    split_image,
)

# Boot disk per worker node: images (~20 GB for the serving image) plus Triton's local copy of
# the model (ephemeral-storage, ~45 GiB for UL2 20B in bf16) do not fit GKE's 100 GB default.
NODE_DISK_GB = 200
APIS = ["container.googleapis.com", "compute.googleapis.com", "storage.googleapis.com",
        "iam.googleapis.com", "iamcredentials.googleapis.com", "artifactregistry.googleapis.com",
        "cloudbuild.googleapis.com", "monitoring.googleapis.com", "logging.googleapis.com",
        # doctor reads the project's IAM policy (projects.getIamPolicy) with application-default
        # credentials, whose quota project is normally this one: the API must be on here.
        "cloudresourcemanager.googleapis.com"]
# The Helm values file the setup script writes and installs the operator with (kuberay.py).
KUBERAY_VALUES = "kuberay-values.yaml"
# Roles each account of ours needs beyond the bucket (cluster/iam.py has the bucket's), granted
# explicitly: in organisations created recently the default Compute Engine account has none
# (Cloud Build, "Cloud Build service account"; GKE, "Use least privilege IAM service
# accounts"), so the nodes and Cloud Build get accounts of their own.
NODE_PROJECT_ROLES = ["roles/container.defaultNodeServiceAccount"]  # logs, metrics
NODE_REPO_ROLE = "roles/artifactregistry.reader"  # image pulls
BUILD_PROJECT_ROLES = ["roles/logging.logWriter"]  # build logs (CLOUD_LOGGING_ONLY)
BUILD_REPO_ROLE = "roles/artifactregistry.writer"  # pushes
BUILD_STAGING_ROLE = "roles/storage.objectViewer"  # reads the uploaded source
# A binding to an account created a moment earlier can fail on IAM's eventual consistency
# (https://cloud.google.com/iam/docs/access-change-propagation): retried, not fatal at once.
RETRY_FUNCTION = ('retry() { for wait in 5 10 20 40 80; do "$@" && return 0; '
                  'echo "retrying in ${wait}s: $*" >&2; sleep "$wait"; done; "$@"; }')

Step = tuple[str, list]  # (what it does, commands: argv lists, or shell lines as str)


def _region(cfg: ClusterConfig) -> str:
    return cfg.zone.rsplit("-", 1)[0]


def gpu_pool_nodes(cfg: ClusterConfig) -> dict[str, int]:
    """How many nodes the GPU pool needs at most: the Ray GPU workers at max_replicas (as many
    per node as node_gpus holds) plus the Triton replicas (serve schedules them on the same
    accelerator's nodes) at triton.max_replicas; and the GPUs that makes (the quota)."""
    g = cfg.gpu_workers
    if g is None:
        return {"ray": 0, "triton": 0, "nodes": 0, "gpus": 0}
    per_node = g.gpus_per_node
    ray_nodes = math.ceil(g.max_replicas / max(1, per_node // g.gpus))
    triton_gpus = cfg.triton.gpus or per_node
    # Replicas that fit a node share it (the scheduler fills a node's free GPUs before the
    # autoscaler adds one); config.py refuses a replica larger than a node.
    triton_nodes = math.ceil(cfg.triton.max_replicas / max(1, per_node // triton_gpus)) \
        if cfg.triton_accelerator == g.accelerator else 0
    nodes = ray_nodes + triton_nodes
    return {"ray": ray_nodes, "triton": triton_nodes, "nodes": nodes, "gpus": nodes * per_node}


def _node_pool(cfg: ClusterConfig, g: WorkerGroup, where: str) -> str:
    if not g.machine_type:
        raise ConfigError(f"{where}.machine_type is needed to create its node pool "
                          f"(e.g. n2-standard-16, a2-ultragpu-2g, g2-standard-8)")
    max_nodes = gpu_pool_nodes(cfg)["nodes"] if g.is_gpu else g.max_replicas
    argv = ["gcloud", "container", "node-pools", "create", g.group, f"--cluster={cfg.name}",
            f"--zone={cfg.zone}", f"--machine-type={g.machine_type}", "--num-nodes=0",
            "--enable-autoscaling", "--min-nodes=0", f"--max-nodes={max_nodes}",
            "--workload-metadata=GKE_METADATA", f"--disk-size={NODE_DISK_GB}",
            f"--service-account={node_gsa(cfg)}"]
    if g.is_gpu:
        # GKE installs the driver and taints the nodes nvidia.com/gpu=present:NoSchedule.
        argv.append(f"--accelerator=type={g.accelerator},count={g.gpus_per_node},"
                    f"gpu-driver-version=default")
    if g.spot:
        argv += ["--spot", "--node-taints=cloud.google.com/gke-spot=true:NoSchedule"]
    return _once(["gcloud", "container", "node-pools", "describe", g.group,
                  f"--cluster={cfg.name}", f"--zone={cfg.zone}"], argv)


def _build_tag(image: str, key: str) -> tuple[str, str]:
    """(repository, tag) of an image the build pushes. A config may name an image by digest
    or without a tag (render and up take it as it is), but a build pushes to a tag."""
    repository, tag, digest = split_image(image)
    if tag is None or digest is not None:
        raise ConfigError(f"{key} {image!r} has {'a digest' if digest else 'no :TAG'}: "
                          f"`python -m cluster gcloud` builds it and pushes it under a tag; "
                          f"name it REGISTRY/PATH:TAG (e.g. us-docker.pkg.dev/PROJECT/t5ft/"
                          f"serving:0.1.0)")
    return repository, tag


def _gsa_name(email: str) -> str:
    return email.split("@", 1)[0]


def _own_gsa(cfg: ClusterConfig, suffix: str) -> str:
    # Account ids are 6-30 characters: the cluster name is cut to leave room for the suffix.
    return f"{cfg.name[:29 - len(suffix)]}-{suffix}@{cfg.project}.iam.gserviceaccount.com"


def node_gsa(cfg: ClusterConfig) -> str:
    """The nodes' Google service account (image pulls, logs, metrics)."""
    return _own_gsa(cfg, "nodes")


def build_gsa(cfg: ClusterConfig) -> str:
    """Cloud Build's service account for our images."""
    return _own_gsa(cfg, "build")


def build_staging(cfg: ClusterConfig) -> str:
    """The bucket Cloud Build's source upload goes to (ours, so teardown can remove it)."""
    return f"gs://{cfg.project}-{cfg.name}-build"


def bucket_url(cfg: ClusterConfig) -> str:
    """The config's bucket, or the one the setup script creates for it."""
    return cfg.bucket or f"gs://{cfg.project}-t5ft"


def registry(cfg: ClusterConfig) -> str:
    """REGION-docker.pkg.dev/PROJECT/REPO: where the config's Ray image lives."""
    return _build_tag(cfg.image, "config.image")[0].rsplit("/", 1)[0]


def helm_values(cfg: ClusterConfig) -> dict:
    """The KubeRay chart values the setup script installs: the gates our objects need on."""
    # The RayCluster of `up` and the RayJob of `up --job`: the objects that carry gated fields.
    objects = [raycluster.raycluster(cfg), raycluster.rayjob(cfg, "true")]
    return kuberay.helm_values(set(kuberay.required_gates(objects)))


def _bind(argv: list[str]) -> list[str]:
    return ["retry", *argv]


def _create_gsa(email: str) -> str:
    return _once(["gcloud", "iam", "service-accounts", "describe", email],
                 ["gcloud", "iam", "service-accounts", "create", _gsa_name(email)])


def _create_bucket(url: str, region: str) -> str:
    return _once(["gcloud", "storage", "buckets", "describe", url],
                 ["gcloud", "storage", "buckets", "create", url, f"--location={region}",
                  "--uniform-bucket-level-access"])


def _once(probe: list[str], create: list[str]) -> str:
    """CREATE unless PROBE (a describe/get) finds the thing: a script stopped part way (a
    quota, a typo in the config) can be run again; under `set -e` a second `create` would stop
    it at the first "already exists". A probe that fails for another reason (no permission, an
    API still being enabled) lets CREATE run and report the real error."""
    return f"{shlex.join(probe)} >/dev/null 2>&1 || {shlex.join(create)}"


def quota_lines(cfg: ClusterConfig) -> list[str]:
    """Comment lines: the GPU quota the pools need (docs/gke.md, section 1)."""
    size = gpu_pool_nodes(cfg)
    if not size["nodes"]:
        return []
    g = cfg.gpu_workers
    assert g is not None
    spot = "preemptible (spot) " if g.spot else ""
    return [f"# GPU pool {g.group}: {size['ray']} node(s) for Ray GPU workers + "
            f"{size['triton']} for Triton replicas = {size['nodes']} x {g.gpus_per_node} "
            f"{g.accelerator} = {size['gpus']} GPUs: GPUS_ALL_REGIONS and the regional "
            f"{spot}quota of {g.accelerator} in {_region(cfg)} must allow {size['gpus']} "
            f"(docs/gke.md, section 1)"]


def steps(cfg: ClusterConfig, config_ref: str) -> list[Step]:
    """Every step, in order, as (title, commands); CONFIG_REF is how the config was named.

    A command is an argv list, or a shell line (str) where the shell must do the work: the
    accelerator check, the values file, the retried bindings."""
    project, zone, region, ns = cfg.project, cfg.zone, _region(cfg), cfg.namespace
    bucket = bucket_url(cfg)
    ksa_gsa = rbac.google_service_accounts(cfg)
    # The images are built where the config says they are: same registry path and tags.
    _, ray_tag = _build_tag(cfg.image, "config.image")
    reg = registry(cfg)
    repo_name = reg.rsplit("/", 1)[-1]
    _, serving_tag = _build_tag(cfg.triton.image, "triton.image")
    pools = [_node_pool(cfg, g, w) for g, w in ((cfg.cpu_workers, "cpu_workers"),
                                                (cfg.gpu_workers, "gpu_workers")) if g]
    # Google account -> its roles on the bucket, derived from cluster/iam.py's call table.
    roles = iam.bucket_roles(cfg.service_accounts.google_service_account,
                             cfg.service_accounts.triton_gsa)
    nodes, builder = node_gsa(cfg), build_gsa(cfg)
    level, _ = rbac.pod_security_level(cfg)
    checks: list = []
    accelerators = sorted({a for a in (cfg.gpu_workers.accelerator if cfg.gpu_workers else None,
                                       cfg.triton_accelerator) if a})
    for acc in accelerators:
        # Before anything is created: the accelerator type must exist in the zone.
        # `describe` fails when the zone has no such type (acceleratorTypes.get).
        checks.append(
            f"gcloud compute accelerator-types describe {shlex.quote(acc)} "
            f"--zone={shlex.quote(zone)} --format='value(name)' >/dev/null || "
            f"{{ echo {shlex.quote(f'{acc} is not offered in {zone}: pick a zone that lists it (gcloud compute accelerator-types list --filter=name:{acc})')} >&2; exit 1; }}")
    values = yaml.safe_dump(helm_values(cfg), sort_keys=False)
    return [
        ("project and APIs", [["gcloud", "config", "set", "project", project],
                              ["gcloud", "services", "enable", *APIS]]),
        (f"the accelerator exists in {zone} (nothing is created before this check)", checks),
        ("service accounts of the nodes and of Cloud Build, with explicit roles (new "
         "organisations give the default compute account none)",
         [_create_gsa(nodes), _create_gsa(builder)]
         + [_bind(["gcloud", "projects", "add-iam-policy-binding", project,
                   f"--member=serviceAccount:{nodes}", f"--role={r}", "--condition=None"])
            for r in NODE_PROJECT_ROLES]
         + [_bind(["gcloud", "projects", "add-iam-policy-binding", project,
                   f"--member=serviceAccount:{builder}", f"--role={r}", "--condition=None"])
            for r in BUILD_PROJECT_ROLES]),
        ("GKE cluster: Workload Identity, GCS FUSE CSI driver, Dataplane V2 (enforces "
         "NetworkPolicy), Managed Prometheus",
         [_once(["gcloud", "container", "clusters", "describe", cfg.name, f"--zone={zone}"],
                ["gcloud", "container", "clusters", "create", cfg.name, f"--zone={zone}",
                 "--release-channel=regular", f"--workload-pool={project}.svc.id.goog",
                 "--addons=GcsFuseCsiDriver", "--enable-dataplane-v2",
                 "--enable-managed-prometheus", f"--machine-type={cfg.head.machine_type}",
                 "--num-nodes=1", f"--service-account={nodes}"])]),
        ("node pools (the GPU pool holds the Ray GPU workers and the Triton replicas)", pools),
        ("bucket", [_create_bucket(bucket, region)]),
        ("Google service accounts, one per role, and their rights on the bucket "
         "(cluster/iam.py: the calls each makes, docs/gke.md)",
         [_create_gsa(g) for g in roles]
         + [_bind(["gcloud", "storage", "buckets", "add-iam-policy-binding", bucket,
                   f"--member=serviceAccount:{g}", f"--role={role}"])
            for g, granted in roles.items() for role in granted]),
        ("Workload Identity: each Kubernetes service account acts as its Google one",
         [_bind(["gcloud", "iam", "service-accounts", "add-iam-policy-binding", gsa,
                 "--role=roles/iam.workloadIdentityUser",
                 f"--member=serviceAccount:{project}.svc.id.goog[{ns}/{ksa}]"])
          for ksa, gsa in ksa_gsa.items()]),
        ("Artifact Registry and the images (docker/cloudbuild.yaml), built as our build account",
         [_once(["gcloud", "artifacts", "repositories", "describe", repo_name,
                 f"--location={region}"],
                ["gcloud", "artifacts", "repositories", "create", repo_name,
                 "--repository-format=docker", f"--location={region}"]),
          _bind(["gcloud", "artifacts", "repositories", "add-iam-policy-binding", repo_name,
                 f"--location={region}", f"--member=serviceAccount:{nodes}",
                 f"--role={NODE_REPO_ROLE}"]),
          _bind(["gcloud", "artifacts", "repositories", "add-iam-policy-binding", repo_name,
                 f"--location={region}", f"--member=serviceAccount:{builder}",
                 f"--role={BUILD_REPO_ROLE}"]),
          _create_bucket(build_staging(cfg), region),
          _bind(["gcloud", "storage", "buckets", "add-iam-policy-binding", build_staging(cfg),
                 f"--member=serviceAccount:{builder}", f"--role={BUILD_STAGING_ROLE}"]),
          ["gcloud", "builds", "submit", f"--region={region}",
           "--config=docker/cloudbuild.yaml",
           f"--service-account=projects/{project}/serviceAccounts/{builder}",
           f"--gcs-source-staging-dir={build_staging(cfg)}/source",
           f"--substitutions=_AR={reg},_RAY_TAG={ray_tag},_SERVING_TAG={serving_tag}",
           "."]]),
        ("credentials for kubectl", [["gcloud", "container", "clusters", "get-credentials",
                                      cfg.name, f"--zone={zone}"]]),
        (f"KubeRay operator {KUBERAY_CHART_VERSION} (the CRDs our objects are validated "
         f"against), with the feature gates our objects need ({KUBERAY_VALUES}: the chart's "
         f"whole featureGates list, since Helm replaces lists)",
         [f"cat > {KUBERAY_VALUES} <<'EOF'\n{values}EOF",
          ["helm", "repo", "add", "kuberay", "https://ray-project.github.io/kuberay-helm/"],
          ["helm", "repo", "update"],
          # upgrade --install: a second run changes nothing, or applies new values; --wait:
          # until the operator's Deployment is available, which doctor (next) requires.
          ["helm", "upgrade", "--install", "kuberay-operator", "kuberay/kuberay-operator",
           f"--version={KUBERAY_CHART_VERSION}", f"--namespace={cfg.kuberay_namespace}",
           "--create-namespace", f"--values={KUBERAY_VALUES}", "--wait"]]),
        ("the namespace first (a server-side dry run needs it), with its Pod Security labels",
         [_once(["kubectl", "get", "namespace", ns], ["kubectl", "create", "namespace", ns]),
          ["kubectl", "label", "namespace", ns, "--overwrite",
           *[f"{k}={v}" for k, v in rbac.psa_labels(cfg).items()]]]),
        (f"check, then create the cluster's objects (pod security: {level}; `up` runs "
         f"`doctor` first)",
         [["python", "-m", "cluster", "render", f"--config={config_ref}"],
          ["python", "-m", "cluster", "doctor", f"--config={config_ref}"],
          ["python", "-m", "cluster", "up", f"--config={config_ref}"]]),
    ]


def _if_found(probe: list[str], *commands: list[str]) -> str:
    """COMMANDS only while PROBE finds the thing: a teardown stopped part way (or run twice)
    goes on past what is already gone; a command that fails on something still there stops
    it under `set -e` (errexit holds inside `then`)."""
    return _only_if(f"{shlex.join(probe)} >/dev/null 2>&1", *commands)


def _only_if(test: str, *commands: list[str]) -> str:
    """One shell line: COMMANDS when the shell TEST succeeds."""
    return f"if {test}; then {'; '.join(shlex.join(c) for c in commands)}; fi"


def _if_bound(project: str, member: str, role: str, *commands: list[str]) -> str:
    """COMMANDS only while the project's IAM policy grants ROLE to MEMBER:
    `remove-iam-policy-binding` fails on a binding already removed ("Policy binding with the
    specified principal, role, and condition not found"), so a teardown stopped between two
    removals would stop there on its rerun. The probe is Google's documented listing of a
    principal's roles (`get-iam-policy --flatten=bindings[].members --filter=...`), which
    prints the role when it is granted and nothing otherwise."""
    probe = shlex.join(["gcloud", "projects", "get-iam-policy", project,
                        "--flatten=bindings[].members",
                        f'--filter=bindings.role="{role}" AND bindings.members="{member}"',
                        "--format=value(bindings.role)"])
    return _only_if(f"{probe} 2>/dev/null | grep -q .", *commands)


def teardown_steps(cfg: ClusterConfig, config_ref: str) -> list[Step]:
    """What the setup script made, removed: the cluster, the images (tens of GB), Cloud
    Build's staging bucket, the service accounts and their project roles. The data bucket
    is left to the user (a commented line). Each removal runs only while its thing exists."""
    project, zone, region = cfg.project, cfg.zone, _region(cfg)
    repo_name = registry(cfg).rsplit("/", 1)[-1]
    accounts = list(dict.fromkeys([cfg.service_accounts.google_service_account,
                                   cfg.service_accounts.triton_gsa]))

    def account(gsa: str) -> list[str]:
        return ["gcloud", "iam", "service-accounts", "describe", gsa]

    unbind = [_if_bound(project, f"serviceAccount:{g}", r,
                        ["gcloud", "projects", "remove-iam-policy-binding", project,
                         f"--member=serviceAccount:{g}", f"--role={r}", "--condition=None"])
              for g, rs in ((node_gsa(cfg), NODE_PROJECT_ROLES),
                            (build_gsa(cfg), BUILD_PROJECT_ROLES)) for r in rs]
    return [
        ("the cluster's objects, then the GKE cluster (stops all node charges); kubectl "
         "pointed at it first, so that `down` deletes in this cluster and no other",
         [_if_found(["gcloud", "container", "clusters", "describe", cfg.name, f"--zone={zone}"],
                    ["gcloud", "container", "clusters", "get-credentials", cfg.name,
                     f"--zone={zone}"],
                    ["python", "-m", "cluster", "down", f"--config={config_ref}"],
                    ["gcloud", "container", "clusters", "delete", cfg.name, f"--zone={zone}",
                     "--quiet"])]),
        ("the images and their repository, and Cloud Build's staging bucket",
         [_if_found(["gcloud", "artifacts", "repositories", "describe", repo_name,
                     f"--location={region}"],
                    ["gcloud", "artifacts", "repositories", "delete", repo_name,
                     f"--location={region}", "--quiet"]),
          _if_found(["gcloud", "storage", "buckets", "describe", build_staging(cfg)],
                    ["gcloud", "storage", "rm", "-r", build_staging(cfg)])]),
        ("the service accounts and their project roles",
         unbind + [_if_found(account(g), ["gcloud", "iam", "service-accounts", "delete", g,
                                          "--quiet"])
                   for g in [*accounts, node_gsa(cfg), build_gsa(cfg)]]),
        ("the data bucket: only when you no longer need the checkpoints and results",
         [f"# gcloud storage rm -r {bucket_url(cfg)}"]),
    ]


def _line(command: list[str] | str) -> str:
    if isinstance(command, str):
        return command
    line = shlex.join(command)
    if command[:4] == ["python", "-m", "cluster", "render"]:
        line += " | kubectl apply --dry-run=server -f -"
    return line


def script(cfg: ClusterConfig, config_ref: str, teardown: bool = False) -> str:
    """STEPS (or TEARDOWN_STEPS) as a shell script: a comment per step, one command a line."""
    if teardown:
        lines = [f"# Google Cloud teardown for {config_ref} (python -m cluster gcloud "
                 f"--teardown)", "set -e"]
        chosen = teardown_steps(cfg, config_ref)
    else:
        lines = [f"# Google Cloud setup for {config_ref} (python -m cluster gcloud)", "set -e",
                 *quota_lines(cfg), RETRY_FUNCTION]
        chosen = steps(cfg, config_ref)
    for title, commands in chosen:
        lines.append(f"\n# {title}")
        lines += [_line(c) for c in commands]
    return "\n".join(lines) + "\n"
