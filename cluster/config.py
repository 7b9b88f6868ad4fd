"""The cluster config: one YAML file describing a KubeRay cluster on GKE.

Everything the renderers need comes from here; nothing else reads the YAML. Unknown keys are
errors (a misspelt `node_selector` that is silently ignored is how GPU workers "never appear",
ray-project/ray #50298), and every error names the key it is about.

Example: examples/cluster-gke.yaml (UL2 20B) and examples/cluster-small.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from core.errors import UserError
from core.yaml_file import read_yaml

# Triton backends an image can serve: "python" runs our JAX engine (docker/serving.Dockerfile),
# "fastertransformer" needs an image with the FT backend built in, which users build themselves.
TritonBackend = Literal["python", "fastertransformer"]
DEFAULT_RAY_VERSION = "2.60.0"
# The KubeRay helm chart `python -m cluster gcloud` installs and the API errors name: the
# release whose CRDs are vendored in cluster/schemas/ (README.md there).
KUBERAY_CHART_VERSION = "1.7.0"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
SPOT_LABEL = "cloud.google.com/gke-spot"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
# An image reference: [host[:port]/]path[:tag][@sha256:digest] (distribution/reference grammar).
_IMAGE = re.compile(r"^(?P<repository>(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?"
                    r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*)"
                    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
                    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$")
_GSA = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9]{4,28}[a-z0-9]"
                  r"\.iam\.gserviceaccount\.com$")


class ConfigError(UserError, ValueError):
    """The config file is wrong; the message names the key."""


# Kubernetes counts (replicas, GPUs) and ids: YAML integers only (strict: "3" and true are not
# counted as 3 and 1), never negative.
Count = Annotated[int, Field(strict=True, ge=0)]


class _Section(BaseModel):
    """A mapping of the YAML file: unknown keys are errors; `cpu: 4` is read as the string "4".

    YAML reads `cpu: 4` and `memory: 0.5` as numbers; Kubernetes quantities are strings, so
    numbers given for string fields become strings (coerce_numbers_to_str; bool stays an error).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class HeadGroup(_Section):
    """The Ray head pod's resources and how its Service is exposed."""

    cpu: str = "2"
    memory: str = "8Gi"
    service_type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = "ClusterIP"
    machine_type: str = "e2-standard-8"  # the default node pool's (`python -m cluster gcloud`)


class WorkerGroup(_Section):
    """One KubeRay worker group.

    accelerator and gpus are set together for a GPU group: the pods then carry the GKE
    accelerator node selector, the nvidia.com/gpu toleration and an nvidia.com/gpu limit.
    """

    group: str
    cpu: str
    memory: str
    replicas: Count = 0
    min_replicas: Count = 0
    max_replicas: Count = 1
    ephemeral_storage: str | None = None
    accelerator: str | None = None
    gpus: Count = 0
    node_gpus: Count | None = None  # GPUs on one node of the group's node pool (default: gpus)
    machine_type: str | None = None  # the node pool's machine type (`python -m cluster gcloud`)
    spot: bool = False

    @property
    def gpus_per_node(self) -> int:
        """The most GPUs one pod can get on this group's nodes: node_gpus, else gpus."""
        return self.node_gpus if self.node_gpus is not None else self.gpus

    @property
    def is_gpu(self) -> bool:
        """Whether the group's pods ask for GPUs (and so go to the accelerator's nodes)."""
        return self.gpus > 0


class Autoscaling(_Section):
    """KubeRay's in-tree autoscaler: on or off, and how eagerly it adds and removes pods."""

    enabled: bool = True
    idle_timeout_seconds: Count = 60
    upscaling_mode: Literal["Default", "Conservative", "Aggressive"] = "Default"


class ServiceAccounts(_Section):
    """The Kubernetes service accounts, each bound to a Google one through Workload Identity.

    ray: the Ray pods' account; the only one the Role is bound to (it launches Triton); acts as
      google_service_account (reads and writes the bucket).
    triton: the Triton pods' account; no Kubernetes rights; acts as
      triton_google_service_account (reads the bucket only), else google_service_account.
    """

    google_service_account: str
    triton_google_service_account: str | None = None
    ray: str = "ray"
    triton: str = "triton"

    @property
    def triton_gsa(self) -> str:
        """The Google service account the Triton pods act as."""
        return self.triton_google_service_account or self.google_service_account


class TritonDefaults(_Section):
    """What `ray_jobs.serve --backend kubernetes` uses unless its flags say otherwise.

    They reach the job through environment variables on the Ray pods (serving/kubernetes.py).
    """

    image: str  # no default: the serving image is built by the user (docs/gke.md)
    backend: TritonBackend = "python"  # what the image serves
    accelerator: str | None = None  # default: the GPU worker group's
    run_as_user: Count | None = 1000  # null for images that must run as root
    cpu: str | None = None
    memory: str | None = None
    spot: bool | None = None  # default: the GPU worker group's
    # How the gs:// model repository reaches Triton: "gcs", Triton's own reader (a local copy
    # on the node's disk, hence the ephemeral-storage request), or "fuse", a read-only mount by
    # the Cloud Storage FUSE CSI driver (no local copy; docs/gke.md, "Images").
    repository: Literal["gcs", "fuse"] = "gcs"
    # What the GPU node pool and the GPU quota are sized for (python -m cluster gcloud): at most
    # this many Triton replicas at once, each with `gpus` GPUs (default: a whole node's,
    # gpu_workers.node_gpus), in the GPU pool beside the Ray GPU workers.
    max_replicas: Count = 1
    gpus: Count | None = None


class ClusterConfig(_Section):
    """The whole file: one KubeRay cluster (or RayJob) on GKE, and Triton's defaults there."""

    name: str
    project: str
    zone: str
    namespace: str
    service_accounts: ServiceAccounts
    image: str
    gpu_image: str
    ray_version: str = DEFAULT_RAY_VERSION
    head: HeadGroup = Field(default_factory=HeadGroup)
    cpu_workers: WorkerGroup | None = None
    gpu_workers: WorkerGroup | None = None
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    triton: TritonDefaults
    bucket: str | None = None  # gs://NAME the jobs use (`python -m cluster gcloud` grants it)
    create_namespace: bool = True
    managed_prometheus: bool = True  # render PodMonitorings (cluster/monitoring.py)
    run_as_user: Count = 1000  # the `ray` user of rayproject/ray images
    # Where the KubeRay operator runs (the Helm release's namespace): the head admits its
    # dashboard port from there (the operator polls RayJob status through it).
    kuberay_namespace: str = "kuberay-system"

    @property
    def worker_groups(self) -> list[WorkerGroup]:
        """The worker groups that are configured, CPU first."""
        return [g for g in (self.cpu_workers, self.gpu_workers) if g is not None]

    @property
    def head_service(self) -> str:
        """The Service KubeRay creates for the head (8265 dashboard/jobs, 10001, 6379)."""
        return f"{self.name}-head-svc"

    @property
    def triton_accelerator(self) -> str | None:
        """The GPU type Triton pods ask for: triton.accelerator, else the GPU group's."""
        if self.triton.accelerator:
            return self.triton.accelerator
        return self.gpu_workers.accelerator if self.gpu_workers else None

    @property
    def triton_spot(self) -> bool:
        """Whether Triton pods go to spot nodes: triton.spot, else the GPU group's."""
        if self.triton.spot is not None:
            return self.triton.spot
        return bool(self.gpu_workers and self.gpu_workers.spot)

    @property
    def triton_node_gpus(self) -> int | None:
        """GPUs on one node Triton pods can land on (the GPU group's pool), None if unknown."""
        return self.gpu_workers.gpus_per_node if self.gpu_workers else None


# The nested mappings, in the order their errors are reported (before the top level's).
_SECTIONS: dict[str, type[_Section]] = {
    "head": HeadGroup, "cpu_workers": WorkerGroup, "gpu_workers": WorkerGroup,
    "autoscaling": Autoscaling, "service_accounts": ServiceAccounts, "triton": TritonDefaults,
}
_STRUCTURE = ("model_type", "extra_forbidden", "missing")  # reported before value errors


def _first_error(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error a person should fix first: the file's shape (unknown, missing keys, a section
    that is not a mapping) before values; the nested sections, in _SECTIONS order, before the
    top level; within one mapping, unknown keys before missing ones."""

    def rank(item: tuple[int, ErrorDetails]) -> tuple[int, int, int, int]:
        index, err = item
        loc, kind = err["loc"], err["type"]
        nested = len(loc) > 1 or kind == "model_type"
        section = list(_SECTIONS).index(loc[0]) if nested else len(_SECTIONS)
        order = _STRUCTURE.index(kind) if kind in _STRUCTURE else len(_STRUCTURE)
        return (kind not in _STRUCTURE, section, order, index)

    return min(enumerate(errors), key=rank)[1]


def _message(err: ErrorDetails) -> str:
    """One pydantic error as the line this file has always printed for it, naming the key."""
    loc, kind, value = err["loc"], err["type"], err["input"]
    if kind == "model_type":
        return f"{loc[0]} must be a mapping, got {type(value).__name__}"
    where, model = (str(loc[0]), _SECTIONS[str(loc[0])]) if len(loc) > 1 \
        else ("config", ClusterConfig)
    key = str(loc[-1])
    if kind == "extra_forbidden":
        return f"unknown key {where}.{key} (known: {', '.join(model.model_fields)})"
    if kind == "missing":
        return f"missing key {where}.{key}"
    if kind == "literal_error":
        choices = get_args(model.model_fields[key].annotation)
        return f"{where}.{key} {value!r} is not one of {', '.join(choices)}"
    if kind in ("int_type", "greater_than_equal"):
        return f"{where}.{key} must be a non-negative integer, got {value!r}"
    return f"{where}.{key}: {err['msg']} (got {value!r})"


def _check_quantity(value: str | None, where: str) -> None:
    if value is not None and not _QUANTITY.match(str(value)):
        raise ConfigError(f"{where} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")


def _check_group(g: WorkerGroup, where: str, gpu: bool) -> None:
    if not _DNS_LABEL.match(g.group):
        raise ConfigError(f"{where}.group {g.group!r} must be a DNS label (a-z, 0-9, -)")
    _check_quantity(g.cpu, f"{where}.cpu")
    _check_quantity(g.memory, f"{where}.memory")
    _check_quantity(g.ephemeral_storage, f"{where}.ephemeral_storage")
    if g.min_replicas > g.max_replicas:
        raise ConfigError(f"{where}.min_replicas {g.min_replicas} exceeds max_replicas "
                          f"{g.max_replicas}")
    if not g.min_replicas <= g.replicas <= g.max_replicas:
        raise ConfigError(f"{where}.replicas {g.replicas} is outside [min_replicas, "
                          f"max_replicas] = [{g.min_replicas}, {g.max_replicas}]")
    if gpu:
        if g.gpus < 1:
            raise ConfigError(f"{where}.gpus must be >= 1 for the GPU worker group")
        if g.node_gpus is not None and g.node_gpus < g.gpus:
            raise ConfigError(f"{where}.gpus {g.gpus} exceeds {where}.node_gpus {g.node_gpus}: "
                              f"the pods would stay Pending")
        if not g.accelerator:
            raise ConfigError(f"{where}.accelerator is required (the GKE accelerator label, "
                              f"e.g. nvidia-a100-80gb, nvidia-h100-80gb, nvidia-l4)")
    elif g.gpus or g.accelerator:
        raise ConfigError(f"{where} is the CPU group: set gpus/accelerator under gpu_workers")


def parse_config(data: Any) -> ClusterConfig:
    """Validate a parsed YAML document and return the ClusterConfig it describes.

    Raises ConfigError with one line naming the key (the first problem, see _first_error).
    """
    if not isinstance(data, dict):
        raise ConfigError("the cluster config must be a YAML mapping")
    # `head:` with nothing under it reads as None: the section's defaults, as if left out.
    data = {key: value for key, value in data.items()
            if not (key in _SECTIONS and value is None)}
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_message(_first_error(exc.errors()))) from None
    _check_values(cfg)
    return cfg


def _check_values(cfg: ClusterConfig) -> None:
    """What types cannot say: names, quantities, accounts, groups and images that fit together."""
    for key in ("name", "namespace"):
        value = getattr(cfg, key)
        if not isinstance(value, str) or not _DNS_LABEL.match(value) or len(value) > 40:
            raise ConfigError(f"config.{key} {value!r} must be a DNS label of at most 40 "
                              f"characters (a-z, 0-9, -)")
    for key in ("ray", "triton"):
        value = getattr(cfg.service_accounts, key)
        if not _DNS_LABEL.match(value):
            raise ConfigError(f"service_accounts.{key} {value!r} must be a DNS label")
    if cfg.service_accounts.ray == cfg.service_accounts.triton:
        raise ConfigError("service_accounts.ray and service_accounts.triton must differ: only "
                          "the Ray account may launch pods")
    for key in ("google_service_account", "triton_google_service_account"):
        gsa = getattr(cfg.service_accounts, key)
        if gsa is None:
            continue
        if not _GSA.match(gsa):
            raise ConfigError(f"service_accounts.{key} {gsa!r} is not of the "
                              f"form NAME@PROJECT.iam.gserviceaccount.com")
        if gsa.split("@")[1].split(".")[0] != cfg.project:
            raise ConfigError(f"service_accounts.{key} {gsa!r} is not in "
                              f"project {cfg.project!r}")
    if cfg.bucket is not None and not re.match(r"^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$",
                                               cfg.bucket):
        raise ConfigError(f"config.bucket {cfg.bucket!r} must be gs://BUCKET (no path)")
    _check_quantity(cfg.head.cpu, "head.cpu")
    _check_quantity(cfg.head.memory, "head.memory")
    if cfg.cpu_workers:
        _check_group(cfg.cpu_workers, "cpu_workers", gpu=False)
    if cfg.gpu_workers:
        _check_group(cfg.gpu_workers, "gpu_workers", gpu=True)
    if cfg.cpu_workers and cfg.gpu_workers and cfg.cpu_workers.group == cfg.gpu_workers.group:
        raise ConfigError("cpu_workers.group and gpu_workers.group must differ")
    for key, value in (("config.image", cfg.image), ("config.gpu_image", cfg.gpu_image),
                       ("triton.image", cfg.triton.image)):
        if not _IMAGE.match(value):
            raise ConfigError(f"{key} {value!r} is not an image reference "
                              f"(REGISTRY/PATH:TAG, e.g. us-docker.pkg.dev/PROJECT/t5ft/ray:0.1.0)")
    if cfg.ray_version not in cfg.image or cfg.ray_version not in cfg.gpu_image:
        # The driver's Ray must match the cluster's (docs/gke.md, section 0).
        raise ConfigError(f"config.ray_version {cfg.ray_version} does not appear in image tags "
                          f"{cfg.image!r} / {cfg.gpu_image!r}")
    _check_quantity(cfg.triton.cpu, "triton.cpu")
    _check_quantity(cfg.triton.memory, "triton.memory")
    if not _DNS_LABEL.match(cfg.kuberay_namespace):
        raise ConfigError(f"config.kuberay_namespace {cfg.kuberay_namespace!r} must be a DNS "
                          f"label")
    if cfg.triton.gpus is not None and cfg.triton_node_gpus is not None \
            and cfg.triton.gpus > cfg.triton_node_gpus:
        raise ConfigError(f"triton.gpus {cfg.triton.gpus} exceeds gpu_workers.node_gpus "
                          f"{cfg.triton_node_gpus}: a replica must fit one node")


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate the YAML config at PATH: a local path or a gs:// URL (core.storage)."""
    path = str(path)
    data = read_yaml(path, "cluster config", ConfigError)
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """(repository, tag or None, digest or None) of an image reference, by the grammar the
    config's images are checked with: "localhost:5000/t5ft/serving" has no tag (":5000" is the
    registry's port), "REGISTRY/ray:2.60.0@sha256:HEX" has both.

    Raises:
      ValueError: REFERENCE is not an image reference.
    """
    match = _IMAGE.match(reference)
    if match is None:
        raise ValueError(f"{reference!r} is not an image reference")
    return match["repository"], match["tag"], match["digest"]
