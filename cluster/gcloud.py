"""The gcloud, helm and kubectl commands that prepare a Google Cloud project for a cluster config.

`python -m cluster gcloud --config CLUSTER.yaml` prints them as a shell script, generated from
the same ClusterConfig that `render` and `up` use, so the project and the objects cannot drift:
the namespace, the service account names and the node pools are read from one place.
Facts relied on (docs/gke.md cites them): Workload Identity Federation for GKE binds
`PROJECT.svc.id.goog[NAMESPACE/KSA]` with roles/iam.workloadIdentityUser; GKE taints GPU node
pools with nvidia.com/gpu and installs the driver with `gpu-driver-version=default`; the
KubeRay chart is pinned to the release whose CRDs are vendored in cluster/schemas/.
"""

from __future__ import annotations

import shlex

from cluster import rbac
from cluster.config import (
    KUBERAY_CHART_VERSION,
    ClusterConfig,
    ConfigError,
    WorkerGroup,
    split_image,
)

KUBERAY_NAMESPACE = "kuberay-system"
# Boot disk per worker node: images (~20 GB for the serving image) plus Triton's local copy of
# the model (ephemeral-storage, ~45 GiB for UL2 20B in bf16) do not fit GKE's 100 GB default.
NODE_DISK_GB = 200
APIS = ["container.googleapis.com", "compute.googleapis.com", "storage.googleapis.com",
        "iam.googleapis.com", "iamcredentials.googleapis.com", "artifactregistry.googleapis.com",
        "cloudbuild.googleapis.com", "monitoring.googleapis.com"]
# Least privilege on the bucket: the runner writes shards and results, Triton only reads.
RUNNER_ROLE = "roles/storage.objectAdmin"
TRITON_ROLE = "roles/storage.objectViewer"

Step = tuple[str, list[list[str]]]  # (what it does, commands as argv lists)


def _region(cfg: ClusterConfig) -> str:
    return cfg.zone.rsplit("-", 1)[0]


def _node_pool(cfg: ClusterConfig, g: WorkerGroup, where: str) -> list[str]:
    if not g.machine_type:
        raise ConfigError(f"{where}.machine_type is needed to create its node pool "
                          f"(e.g. n2-standard-16, a2-ultragpu-2g, g2-standard-8)")
    argv = ["gcloud", "container", "node-pools", "create", g.group, f"--cluster={cfg.name}",
            f"--zone={cfg.zone}", f"--machine-type={g.machine_type}", "--num-nodes=0",
            "--enable-autoscaling", "--min-nodes=0", f"--max-nodes={g.max_replicas}",
            "--workload-metadata=GKE_METADATA", f"--disk-size={NODE_DISK_GB}"]
    if g.is_gpu:
        # GKE installs the driver and taints the nodes nvidia.com/gpu=present:NoSchedule.
        argv.append(f"--accelerator=type={g.accelerator},count={g.gpus_per_node},"
                    f"gpu-driver-version=default")
    if g.spot:
        argv += ["--spot", "--node-taints=cloud.google.com/gke-spot=true:NoSchedule"]
    return argv


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


def steps(cfg: ClusterConfig, config_ref: str) -> list[Step]:
    """Every step, in order, as (title, argv lists); CONFIG_REF is how the config was named."""
    project, zone, region, ns = cfg.project, cfg.zone, _region(cfg), cfg.namespace
    bucket = cfg.bucket or f"gs://{project}-t5ft"
    ksa_gsa = rbac.google_service_accounts(cfg)
    # The images are built where the config says they are: same registry path and tags.
    ray_repository, ray_tag = _build_tag(cfg.image, "config.image")
    registry = ray_repository.rsplit("/", 1)[0]
    _, serving_tag = _build_tag(cfg.triton.image, "triton.image")
    pools = [_node_pool(cfg, g, w) for g, w in ((cfg.cpu_workers, "cpu_workers"),
                                                (cfg.gpu_workers, "gpu_workers")) if g]
    # Google account -> its role on the bucket: one per role, runner first, without repeats
    # (Triton's account is the runner's when the config names none of its own).
    roles = {cfg.service_accounts.google_service_account: RUNNER_ROLE}
    roles.setdefault(cfg.service_accounts.triton_gsa, TRITON_ROLE)
    level, _ = rbac.pod_security_level(cfg)
    return [
        ("project and APIs", [["gcloud", "config", "set", "project", project],
                              ["gcloud", "services", "enable", *APIS]]),
        ("GKE cluster: Workload Identity, GCS FUSE CSI driver, Dataplane V2 (enforces "
         "NetworkPolicy), Managed Prometheus",
         [["gcloud", "container", "clusters", "create", cfg.name, f"--zone={zone}",
           "--release-channel=regular", f"--workload-pool={project}.svc.id.goog",
           "--addons=GcsFuseCsiDriver", "--enable-dataplane-v2", "--enable-managed-prometheus",
           f"--machine-type={cfg.head.machine_type}", "--num-nodes=1"]]),
        ("node pools", pools),
        ("bucket", [["gcloud", "storage", "buckets", "create", bucket, f"--location={region}",
                     "--uniform-bucket-level-access"]]),
        ("Google service accounts, one per role, and their rights on the bucket",
         [["gcloud", "iam", "service-accounts", "create", _gsa_name(g)] for g in roles]
         + [["gcloud", "storage", "buckets", "add-iam-policy-binding", bucket,
             f"--member=serviceAccount:{g}", f"--role={role}"] for g, role in roles.items()]),
        ("Workload Identity: each Kubernetes service account acts as its Google one",
         [["gcloud", "iam", "service-accounts", "add-iam-policy-binding", gsa,
           "--role=roles/iam.workloadIdentityUser",
           f"--member=serviceAccount:{project}.svc.id.goog[{ns}/{ksa}]"]
          for ksa, gsa in ksa_gsa.items()]),
        ("Artifact Registry and the images (docker/cloudbuild.yaml)",
         [["gcloud", "artifacts", "repositories", "create", registry.rsplit("/", 1)[-1],
           "--repository-format=docker", f"--location={region}"],
          ["gcloud", "builds", "submit", f"--region={region}",
           "--config=docker/cloudbuild.yaml",
           f"--substitutions=_AR={registry},_RAY_TAG={ray_tag},_SERVING_TAG={serving_tag}",
           "."]]),
        ("credentials for kubectl", [["gcloud", "container", "clusters", "get-credentials",
                                      cfg.name, f"--zone={zone}"]]),
        (f"KubeRay operator {KUBERAY_CHART_VERSION} (the CRDs our objects are validated "
         f"against)",
         [["helm", "repo", "add", "kuberay", "https://ray-project.github.io/kuberay-helm/"],
          ["helm", "repo", "update"],
          ["helm", "install", "kuberay-operator", "kuberay/kuberay-operator",
           f"--version={KUBERAY_CHART_VERSION}", f"--namespace={KUBERAY_NAMESPACE}",
           "--create-namespace"]]),
        ("the namespace first (a server-side dry run needs it), with its Pod Security labels",
         [["kubectl", "create", "namespace", ns],
          ["kubectl", "label", "namespace", ns, "--overwrite",
           *[f"{k}={v}" for k, v in rbac.psa_labels(cfg).items()]]]),
        (f"check, then create the cluster's objects (pod security: {level})",
         [["python", "-m", "cluster", "render", f"--config={config_ref}"],
          ["python", "-m", "cluster", "up", f"--config={config_ref}"]]),
    ]


def script(cfg: ClusterConfig, config_ref: str) -> str:
    """STEPS as a shell script: a comment per step, one command per line."""
    lines = [f"# Google Cloud setup for {config_ref} (python -m cluster gcloud)", "set -e"]
    for title, commands in steps(cfg, config_ref):
        lines.append(f"\n# {title}")
        for argv in commands:
            line = shlex.join(argv)
            if argv[:4] == ["python", "-m", "cluster", "render"]:
                line += " | kubectl apply --dry-run=server -f -"
            lines.append(line)
    return "\n".join(lines) + "\n"
