"""`ray_jobs.serve --backend kubernetes`: Triton as a Deployment and Service on the cluster.

From inside the Ray cluster (in-cluster config, the head's service account and the Role that
`python -m cluster` renders) or from a kubeconfig:

1. read the model's config.pbtxt for its GPU count (tensor_para_size x pipeline_para_size);
2. create (or patch) the Service and the Deployment (cluster/triton.py builds them);
3. wait until every replica passes /v2/health/ready (all models loaded), reporting on stderr
   why pods are pending (cluster/diagnose.py);
4. give the endpoints (one Service in front of every replica); ray_jobs.serve prints them as
   its ready line and, on SIGINT/SIGTERM, :meth:`KubernetesServers.stop` deletes both objects.

Defaults not given as flags come from the Ray head's environment, which the cluster config
sets (cluster/raycluster.py: T5FT_*): namespace, Triton image, service account, GPU type.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from typing import TYPE_CHECKING, Any

from google.protobuf import text_format

from cluster import diagnose, pods, raycluster, triton
from cluster.kubeapi import Kube, new_api_client
from cluster.wait import wait_for
from core import storage
from core.errors import UserError
from core.repository import ConvertedModel, config_url
from serving.servers import ServersBase

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from serving.options import ServeOptions

# Every API call serve makes is bounded, so that SIGTERM's teardown fits the stop grace the
# cluster gives jobs (cluster/raycluster.JOB_STOP_WAIT_S; stop_seconds_bound). A healthy API
# server answers in well under a second.
REQUEST_TIMEOUT_S = 10.0
# Teardown retries less than launch: a job being stopped has a deadline.
TEARDOWN_RETRIES = 2
# The most calls a SIGTERM can find in flight, i.e. between two looks at the stop event:
# wait_ready's poll (get the Deployment, list its pods, list events: 3); launch looks before
# each object (create, then patch when it exists: 2); start's checks (service account, owner: 2).
IN_FLIGHT_CALLS = 3


LOG = logging.getLogger(__name__)


def _log(message: str) -> None:
    """One progress line on stderr, through the entry point's logging."""
    LOG.info("%s", message)


def read_model_config(model_repository: str, model_name: str) -> ModelConfig:
    """The model's config.pbtxt as tritonclient's ModelConfig protobuf (local path or gs://)."""
    url = config_url(model_repository, model_name)
    try:
        return ConvertedModel.open(model_repository, model_name).config
    except text_format.ParseError as exc:
        raise UserError(f"{url} is not a valid Triton model config: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any read failure is the same problem for the user
        raise UserError(f"cannot read {url} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); the Deployment's "
                        f"GPU count comes from its tensor_para_size") from exc


def gpus_for(model_config: ModelConfig) -> int:
    """GPUs one replica needs: FT puts tensor x pipeline ranks in one server."""
    params = model_config.parameters
    total = 1
    for key in ("tensor_para_size", "pipeline_para_size"):
        if key in params:
            value = params[key].string_value
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"config.pbtxt parameter {key} is {value!r}, not a positive "
                                f"integer")
            total *= int(value)
    return total


def check_fits(model_config: ModelConfig, gpus: int, node_gpus: str | None) -> None:
    """One clear error when a replica's GPUs exceed a node of the pool (env T5FT_TRITON_NODE_GPUS
    from the cluster config): such a pod would stay Pending until the ready timeout."""
    if not node_gpus or gpus <= int(node_gpus):
        return
    params = model_config.parameters
    parallel = " x ".join(f"{key} {params[key].string_value}" for key in
                          ("tensor_para_size", "pipeline_para_size") if key in params)
    raise UserError(f"model {model_config.name} ({parallel or 'one GPU'}) needs {gpus} GPUs in "
                    f"one pod but a node of the GPU pool has {node_gpus} "
                    f"(gpu_workers.node_gpus): the pod would stay Pending; lower "
                    f"tensor_parallel x pipeline_parallel or use larger nodes")


def check_backend(model_config: ModelConfig, image_backend: str | None) -> None:
    """One clear error when the converted model's backend is not the one the cluster's Triton
    image serves (env T5FT_TRITON_BACKEND, the cluster config's triton.backend): a JAX-engine
    repository (backend "python") on an FT image, or the other way round, would fail to load
    only after the pod was scheduled and the image pulled."""
    if image_backend and model_config.backend != image_backend:
        engine = {"python": "jax", "fastertransformer": "fastertransformer"}
        raise UserError(
            f"model {model_config.name} is for Triton's {model_config.backend!r} backend but the "
            f"cluster's Triton image serves {image_backend!r} (triton.backend); convert with "
            f"--engine {engine.get(image_backend, image_backend)} or set triton.image/backend")


def mounts_repository(model_repository: str, access: str | None) -> bool:
    """Whether Triton gets the repository mounted by the Cloud Storage FUSE CSI driver.

    ACCESS is the cluster config's triton.repository (env T5FT_TRITON_REPOSITORY): "fuse"
    mounts the bucket, "gcs" (the default) lets Triton read gs:// itself. One clear error when
    "fuse" is asked for a repository that is not in a bucket.
    """
    if access != "fuse":
        return False
    if not storage.is_gcs(model_repository):
        raise UserError(f"triton.repository is fuse but the model repository "
                        f"{model_repository} is not gs://BUCKET/PATH: only a bucket can be "
                        f"mounted; use triton.repository: gcs for other paths")
    return True


def local_copy_storage(model_repository: str, model_name: str) -> str | None:
    """The ephemeral-storage a Triton pod requests for its local copy of a gs:// model.

    Triton copies a cloud model to a local temporary directory before loading it, so the pod
    needs the model's size on its node's disk, or the kubelet evicts it mid-copy. The size is
    the model folder's files (one listing, once at launch) plus 10% and 2 GiB for
    logs and Triton's own files. None for a local repository (nothing is copied).
    """
    if not storage.is_gcs(model_repository):
        return None
    folder = storage.join(model_repository, model_name)
    total = sum(storage.list_sizes(folder).values())
    return f"{math.ceil(total * 1.1 / 2**30) + 2}Gi"


def triton_spec(opts: ServeOptions) -> triton.TritonSpec:
    """Resolve options, then the head's environment, then defaults, into a TritonSpec.

    ``opts`` is a ServeOptions (or any object with its attribute names: model_repository,
    model_name, replicas, *_port, ready_timeout, namespace, image, service_account).
    """
    env = os.environ
    namespace = opts.namespace
    if namespace in (None, "default") and env.get(raycluster.ENV_NAMESPACE):
        # On a cluster from `python -m cluster`, serve next to it (the Role is namespaced).
        namespace = env[raycluster.ENV_NAMESPACE]
    text = env.get(raycluster.ENV_TRITON_RUN_AS_USER)
    run_as = 1000 if text is None else (int(text) if text.strip() else None)
    model_config = read_model_config(opts.model_repository, opts.model_name)
    gpus = gpus_for(model_config)
    check_fits(model_config, gpus, env.get(raycluster.ENV_TRITON_NODE_GPUS))
    check_backend(model_config, env.get(raycluster.ENV_TRITON_BACKEND))
    image = opts.image or env.get(raycluster.ENV_TRITON_IMAGE)
    if not image:
        raise UserError("no Triton image: pass --image (off a cluster from `python -m cluster`, "
                        "whose triton.image sets it); docs/gke.md says how to build one")
    ports = (opts.http_port or triton.HTTP_PORT, opts.grpc_port or triton.GRPC_PORT,
             opts.metrics_port or triton.METRICS_PORT)
    mount = mounts_repository(opts.model_repository,
                              env.get(raycluster.ENV_TRITON_REPOSITORY))
    if not opts.model_repository.startswith("gs://"):
        _log(f"note: model repository {opts.model_repository} is not gs://; Triton pods see "
             f"only what their image holds or mounts")
    try:
        return triton.TritonSpec(
            model_name=opts.model_name,
            model_repository=opts.model_repository,
            namespace=namespace or "default",
            image=image,
            gpus=gpus,
            replicas=opts.replicas,
            accelerator=env.get(raycluster.ENV_TRITON_ACCELERATOR),
            service_account=opts.service_account or env.get(
                raycluster.ENV_TRITON_SERVICE_ACCOUNT),
            run_as_user=run_as,
            cpu=env.get(raycluster.ENV_TRITON_CPU),
            memory=env.get(raycluster.ENV_TRITON_MEMORY),
            service_ports=ports,
            startup_seconds=int(opts.ready_timeout),
            spot=env.get(raycluster.ENV_TRITON_SPOT) == "true",
            # A mounted bucket is read in place: no local copy, no disk to request for it.
            ephemeral_storage=None if mount else local_copy_storage(opts.model_repository,
                                                                     opts.model_name),
            mount_repository=mount,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def check_service_account(kube: Kube, spec: triton.TritonSpec) -> None:
    """The pods' service account must exist before the Deployment is made: without it the
    ReplicaSet creates no pod at all and serve would wait its whole ready timeout."""
    if spec.service_account and kube.get("ServiceAccount", spec.service_account,
                                         spec.namespace) is None:
        raise UserError(f"service account {spec.service_account!r} not found in namespace "
                        f"{spec.namespace!r}: Triton pods could not be created; use the "
                        f"cluster config's service_accounts.triton (python -m cluster up "
                        f"creates it) or leave --service-account unset on the cluster")


def owner(kube: Kube, namespace: str) -> dict[str, str] | None:
    """The RayCluster or RayJob (named in the head's T5FT_OWNER_* env) as an ownerReference,
    so a crashed job's Tritons go with its cluster; None off such a cluster or if it is gone."""
    kind, name = os.environ.get(raycluster.ENV_OWNER_KIND), os.environ.get(
        raycluster.ENV_OWNER_NAME)
    if not kind or not name:
        return None
    obj = kube.get(kind, name, namespace)
    if obj is None:
        _log(f"note: {kind} {name} not found in {namespace}; Triton gets no owner")
        return None
    return {"apiVersion": raycluster.API_VERSION, "kind": kind, "name": name,
            "uid": obj["metadata"]["uid"]}


def launch(kube: Kube, spec: triton.TritonSpec, created: list[tuple[str, str]],
           stop: threading.Event | None = None) -> None:
    """Create or patch the Service and the Deployment, noting each in CREATED as soon as it
    exists, so that a failure half-way still deletes what was made. Raises UserError instead
    of creating the next object once STOP is set (a SIGTERM's teardown has a deadline)."""
    for obj in (triton.service(spec), triton.deployment(spec)):
        if stop is not None and stop.is_set():
            raise UserError(f"stopped before {spec.name} was launched")
        outcome, _ = kube.apply(obj)
        created.append((obj["kind"], obj["metadata"]["name"]))
        _log(f"{obj['kind']}/{obj['metadata']['name']} in {spec.namespace}: {outcome}")


def deployment_ready(dep: dict | None, replicas: int) -> bool:
    """Every replica of the current generation passes its readiness probe."""
    if not dep:
        return False
    status = dep.get("status") or {}
    generation = (dep.get("metadata") or {}).get("generation")
    if generation is not None and status.get("observedGeneration", 0) < generation:
        return False
    return (status.get("readyReplicas") or 0) >= replicas and \
        (status.get("updatedReplicas", replicas) or 0) >= replicas


def why_not_ready(kube: Kube, spec: triton.TritonSpec) -> str:
    """A line saying where the replicas are: ready count, short resources, reasons."""
    selector = pods.selector(pods.labels(triton.COMPONENT, spec.name))
    pod_list = kube.list("Pod", spec.namespace, label_selector=selector)
    events = kube.list("Event", spec.namespace) if pod_list else []
    short: list[str] = []
    reasons: list[str] = []
    ready = 0
    for pod in pod_list:
        if diagnose.pod_ready(pod):
            ready += 1
            continue
        s, r = diagnose.pod_problems(pod, events)
        short += [x for x in s if x not in short]
        reasons += [x for x in r if x not in reasons]
    line = f"{spec.name}: {ready}/{spec.replicas} ready, {len(pod_list)} pods"
    if short:
        line += f"; short of {', '.join(short)}"
    if reasons:
        line += f"; {'; '.join(reasons)}"
    return line


def wait_ready(kube: Kube, spec: triton.TritonSpec, timeout: float, stop: threading.Event,
               poll: float = 5.0) -> None:
    """Poll the Deployment every ``poll`` s until every replica is ready; report changes in
    why not on stderr. Raises UserError on timeout, or when ``stop`` is set first."""
    if stop.is_set():  # no poll's worth of calls after a SIGTERM (IN_FLIGHT_CALLS)
        raise UserError(f"stopped before {spec.name} was ready")
    wait_for(lambda: deployment_ready(kube.get("Deployment", spec.name, spec.namespace),
                                      spec.replicas),
             lambda: why_not_ready(kube, spec), timeout, poll, what=spec.name, stop=stop)


def teardown_kube(kube: Kube) -> Kube:
    """KUBE's connection with the teardown's bounded retries (TEARDOWN_RETRIES)."""
    return Kube(kube.api_client, retries=TEARDOWN_RETRIES, backoff=kube.backoff,
                request_timeout=REQUEST_TIMEOUT_S)


def stop_seconds_bound(kube: Kube, objects: int = 2) -> float:
    """The longest serve can take from SIGTERM to the end of its teardown with KUBE: the calls
    in flight (IN_FLIGHT_CALLS), then one DELETE per object (the Deployment, the Service).
    It does not wait for the pods to go: their deletion propagates in the background."""
    return (IN_FLIGHT_CALLS * kube.call_seconds_bound()
            + objects * teardown_kube(kube).call_seconds_bound())


def teardown(kube: Kube, created: list[tuple[str, str]], namespace: str) -> None:
    """Delete what :func:`launch` made, the Deployment first (its pods hold the GPUs)."""
    for kind, name in sorted(created, key=lambda kn: kn[0] != "Deployment"):
        try:
            gone = kube.delete(kind, name, namespace)
            _log(f"{kind}/{name}: {'deleted' if gone else 'already gone'}")
        except UserError as exc:
            _log(f"could not delete {kind}/{name}: {exc}")


class KubernetesServers(ServersBase):
    """A Triton Deployment and Service for one model: :class:`serving.api.Servers`' shape.

    ``start`` launches and waits (``opts.ready_timeout``); ``stop`` deletes both objects. One
    Service fronts every replica, so there is one endpoint whatever ``opts.replicas`` is.
    """

    def __init__(self, opts: ServeOptions) -> None:
        self.spec = triton_spec(opts)
        self.kube = Kube(new_api_client(opts.kubeconfig), request_timeout=REQUEST_TIMEOUT_S)
        self.ready_timeout = float(opts.ready_timeout)
        self.cancel = threading.Event()  # set it to abort a start that is still waiting
        self.created: list[tuple[str, str]] = []
        self.endpoints: list[dict[str, str]] = []

    def start(self) -> list[dict[str, str]]:
        """Create (or patch) both objects and wait until every replica is ready."""
        if self.endpoints:
            return self.endpoints
        check_service_account(self.kube, self.spec)
        self.spec = spec = dataclasses.replace(self.spec, owner=owner(self.kube,
                                                                      self.spec.namespace))
        _log(f"launching {spec.replicas} Triton replica(s) of {spec.model_name} with "
             f"{spec.gpus} GPU(s) each in namespace {spec.namespace}")
        try:
            launch(self.kube, spec, self.created, self.cancel)
            wait_ready(self.kube, spec, self.ready_timeout, self.cancel)
        except BaseException:
            self.stop()
            raise
        self.endpoints = [triton.endpoints(spec)]
        return self.endpoints

    def grpc_urls(self) -> list[str]:
        """``host:port`` of the Service's gRPC port (empty before :meth:`start`)."""
        return [e["grpc"] for e in self.endpoints]

    def is_ready(self) -> bool:
        """Every replica of the current generation passes its readiness probe."""
        return deployment_ready(self.kube.get("Deployment", self.spec.name,
                                              self.spec.namespace), self.spec.replicas)

    def status(self) -> list[dict[str, Any]]:
        """One entry for the Deployment: ``{"ready": bool}``."""
        return [{"ready": self.is_ready()}]

    def alive(self) -> bool:
        """Started and not stopped (the Deployment restarts its own pods)."""
        return bool(self.created)

    def stop(self) -> None:
        """Delete the Deployment and the Service; safe to call twice."""
        created, self.created = self.created, []
        self.endpoints = []
        if created:
            teardown(teardown_kube(self.kube), created, self.spec.namespace)
