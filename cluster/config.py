"""The cluster config: one YAML file describing a KubeRay cluster on GKE.

Everything the renderers need comes from here; nothing else reads the YAML. Unknown keys are
errors (a misspelt `node_selector` that is silently ignored is how GPU workers "never appear",
ray-project/ray #50298), and every error names the key it is about.

Example: examples/cluster-gke.yaml (UL2 20B) and examples/cluster-small.yaml.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

# NeMo's inference image carries Triton with the FasterTransformer backend built in.
DEFAULT_TRITON_IMAGE = "nvcr.io/ea-bignlp/bignlp-inference:22.08-py3"
DEFAULT_RAY_VERSION = "2.60.0"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
SPOT_LABEL = "cloud.google.com/gke-spot"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
_GSA = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9]{4,28}[a-z0-9]"
                  r"\.iam\.gserviceaccount\.com$")


class ConfigError(ValueError):
    """The config file is wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    cpu: str = "2"
    memory: str = "8Gi"
    service_type: str = "ClusterIP"  # ClusterIP | LoadBalancer | NodePort


@dataclasses.dataclass(frozen=True)
class WorkerGroup:
    """One KubeRay worker group.

    accelerator and gpus are set together for a GPU group: the pods then carry the GKE
    accelerator node selector, the nvidia.com/gpu toleration and an nvidia.com/gpu limit.
    """

    group: str
    cpu: str
    memory: str
    replicas: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    ephemeral_storage: str | None = None
    accelerator: str | None = None
    gpus: int = 0
    spot: bool = False

    @property
    def is_gpu(self) -> bool:
        return self.gpus > 0


@dataclasses.dataclass(frozen=True)
class Autoscaling:
    enabled: bool = True
    idle_timeout_seconds: int = 60
    upscaling_mode: str = "Default"  # Default | Conservative | Aggressive


@dataclasses.dataclass(frozen=True)
class ServiceAccounts:
    """The Kubernetes service accounts, bound to a Google one through Workload Identity.

    ray: the Ray pods' account; the only one the Role is bound to (it launches Triton).
    triton: the Triton pods' account; it reads gs:// and has no Kubernetes rights at all.
    """

    google_service_account: str
    ray: str = "ray"
    triton: str = "triton"


@dataclasses.dataclass(frozen=True)
class TritonDefaults:
    """What `ray_jobs.serve --backend kubernetes` uses unless its flags say otherwise.

    They reach the job through environment variables on the Ray pods (serving/kubernetes.py).
    """

    image: str = DEFAULT_TRITON_IMAGE
    accelerator: str | None = None  # default: the GPU worker group's
    run_as_user: int | None = 1000  # null for images that must run as root
    cpu: str | None = None
    memory: str | None = None


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    name: str
    project: str
    zone: str
    namespace: str
    service_accounts: ServiceAccounts
    image: str
    gpu_image: str
    ray_version: str = DEFAULT_RAY_VERSION
    head: HeadGroup = HeadGroup()
    cpu_workers: WorkerGroup | None = None
    gpu_workers: WorkerGroup | None = None
    autoscaling: Autoscaling = Autoscaling()
    triton: TritonDefaults = TritonDefaults()
    create_namespace: bool = True
    run_as_user: int = 1000  # the `ray` user of rayproject/ray images

    @property
    def worker_groups(self) -> list[WorkerGroup]:
        return [g for g in (self.cpu_workers, self.gpu_workers) if g is not None]

    @property
    def head_service(self) -> str:
        """The Service KubeRay creates for the head (8265 dashboard/jobs, 10001, 6379)."""
        return f"{self.name}-head-svc"

    @property
    def triton_accelerator(self) -> str | None:
        if self.triton.accelerator:
            return self.triton.accelerator
        return self.gpu_workers.accelerator if self.gpu_workers else None


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass CLS from mapping DATA; unknown or missing keys name WHERE."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(fields)})")
    missing = [name for name, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and name not in data]
    if missing:
        raise ConfigError(f"missing key {where}.{missing[0]}")
    values = {}
    for key, value in data.items():
        expected = fields[key].type
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "str" in expected \
                and "int" not in expected:
            value = str(value)  # YAML reads `cpu: 4` as an int; quantities are strings
        values[key] = value
    return cls(**values)


def _check_quantity(value: str | None, where: str) -> None:
    if value is not None and not _QUANTITY.match(str(value)):
        raise ConfigError(f"{where} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")


def _check_group(g: WorkerGroup, where: str, gpu: bool) -> None:
    if not _DNS_LABEL.match(g.group):
        raise ConfigError(f"{where}.group {g.group!r} must be a DNS label (a-z, 0-9, -)")
    _check_quantity(g.cpu, f"{where}.cpu")
    _check_quantity(g.memory, f"{where}.memory")
    _check_quantity(g.ephemeral_storage, f"{where}.ephemeral_storage")
    for key in ("replicas", "min_replicas", "max_replicas", "gpus"):
        value = getattr(g, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative integer, got {value!r}")
    if g.min_replicas > g.max_replicas:
        raise ConfigError(f"{where}.min_replicas {g.min_replicas} exceeds max_replicas "
                          f"{g.max_replicas}")
    if not g.min_replicas <= g.replicas <= g.max_replicas:
        raise ConfigError(f"{where}.replicas {g.replicas} is outside [min_replicas, "
                          f"max_replicas] = [{g.min_replicas}, {g.max_replicas}]")
    if gpu:
        if g.gpus < 1:
            raise ConfigError(f"{where}.gpus must be >= 1 for the GPU worker group")
        if not g.accelerator:
            raise ConfigError(f"{where}.accelerator is required (the GKE accelerator label, "
                              f"e.g. nvidia-a100-80gb, nvidia-h100-80gb, nvidia-l4)")
    elif g.gpus or g.accelerator:
        raise ConfigError(f"{where} is the CPU group: set gpus/accelerator under gpu_workers")


def parse_config(data: Any) -> ClusterConfig:
    """Validate a parsed YAML document and return the ClusterConfig it describes."""
    if not isinstance(data, dict):
        raise ConfigError("the cluster config must be a YAML mapping")
    data = dict(data)
    nested = {
        "head": (HeadGroup, "head"),
        "cpu_workers": (WorkerGroup, "cpu_workers"),
        "gpu_workers": (WorkerGroup, "gpu_workers"),
        "autoscaling": (Autoscaling, "autoscaling"),
        "service_accounts": (ServiceAccounts, "service_accounts"),
        "triton": (TritonDefaults, "triton"),
    }
    for key, (cls, where) in nested.items():
        if data.get(key) is not None:
            data[key] = _build(cls, data[key], where)
        else:
            data.pop(key, None)
    cfg: ClusterConfig = _build(ClusterConfig, data, "config")

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
    gsa = cfg.service_accounts.google_service_account
    if not _GSA.match(gsa):
        raise ConfigError(f"service_accounts.google_service_account {gsa!r} is not of the "
                          f"form NAME@PROJECT.iam.gserviceaccount.com")
    if gsa.split("@")[1].split(".")[0] != cfg.project:
        raise ConfigError(f"service_accounts.google_service_account {gsa!r} is not in "
                          f"project {cfg.project!r}")
    if cfg.head.service_type not in ("ClusterIP", "LoadBalancer", "NodePort"):
        raise ConfigError(f"head.service_type {cfg.head.service_type!r} is not one of "
                          f"ClusterIP, LoadBalancer, NodePort")
    _check_quantity(cfg.head.cpu, "head.cpu")
    _check_quantity(cfg.head.memory, "head.memory")
    if cfg.cpu_workers:
        _check_group(cfg.cpu_workers, "cpu_workers", gpu=False)
    if cfg.gpu_workers:
        _check_group(cfg.gpu_workers, "gpu_workers", gpu=True)
    if cfg.cpu_workers and cfg.gpu_workers and cfg.cpu_workers.group == cfg.gpu_workers.group:
        raise ConfigError("cpu_workers.group and gpu_workers.group must differ")
    if cfg.autoscaling.upscaling_mode not in ("Default", "Conservative", "Aggressive"):
        raise ConfigError(f"autoscaling.upscaling_mode {cfg.autoscaling.upscaling_mode!r} is "
                          f"not one of Default, Conservative, Aggressive")
    if not cfg.image or not cfg.gpu_image:
        raise ConfigError("config.image and config.gpu_image must name images")
    if cfg.ray_version not in cfg.image or cfg.ray_version not in cfg.gpu_image:
        # The driver's Ray must match the cluster's (docs/gke.md, section 0).
        raise ConfigError(f"config.ray_version {cfg.ray_version} does not appear in image tags "
                          f"{cfg.image!r} / {cfg.gpu_image!r}")
    _check_quantity(cfg.triton.cpu, "triton.cpu")
    _check_quantity(cfg.triton.memory, "triton.memory")
    return cfg


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate the YAML config at PATH."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster config {path} is not valid YAML: "
                          f"{str(exc).splitlines()[0]}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
