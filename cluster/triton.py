"""A Triton Deployment and Service for one model (pure).

serving/kubernetes.py decides the values (flags, the head's environment, the model's
config.pbtxt) and applies what this module builds through cluster/kubeapi.py.
"""

from __future__ import annotations

import dataclasses
import re

from kubernetes import client

from cluster import pods
from core.gcs_env import split_gs_url

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002

# The Cloud Storage FUSE CSI driver (GKE add-on GcsFuseCsiDriver): the pod annotation that makes
# its webhook inject the gcsfuse sidecar, and the CSI driver name of an inline ephemeral volume
# (cloud.google.com/kubernetes-engine/docs/how-to/cloud-storage-fuse-csi-driver-ephemeral;
# GoogleCloudPlatform/gcs-fuse-csi-driver@v1.24.0 pkg/webhook/mutatingwebhook.go and
# examples/ephemeral/deployment-non-root.yaml).
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
GCSFUSE_ANNOTATION = "gke-gcsfuse/volumes"
# The sidecar's default limits are 250m CPU, 256Mi memory, 5Gi ephemeral storage
# (cmd/webhook/main.go); streaming 40 GB of weights needs more. "0" lifts a limit and keeps the
# default request (pkg/webhook/config.go, populateResource), on Standard clusters.
GCSFUSE_SIDECAR_LIMITS = {f"gke-gcsfuse/{r}-limit": "0"
                          for r in ("cpu", "memory", "ephemeral-storage")}
REPOSITORY_MOUNT = "/model-repository"
COMPONENT = "triton"
# Every Triton object serve launches, whatever its model (pods.labels without the instance):
# what Managed Prometheus scrapes (monitoring.py) and `python -m cluster down` deletes.
SELECTOR = {"app.kubernetes.io/name": COMPONENT, "app.kubernetes.io/managed-by": pods.MANAGED_BY}


@dataclasses.dataclass(frozen=True)
class TritonSpec:
    """One served model.

    Attributes:
      model_name: the Triton model name (folder under the repository).
      model_repository: gs://bucket/prefix (Triton reads GCS itself with the pod's Workload
        Identity) or any path the image can see.
      namespace: where the Deployment and Service go.
      image: a Triton image with the model's backend: ours (docker/serving.Dockerfile) serves the
        JAX engine through the Python backend; an FT model needs an image with that backend.
      gpus: nvidia.com/gpu per replica = the model's tensor-parallel size.
      replicas: Deployment replicas behind one Service.
      accelerator: GKE accelerator label to select (None: no GPU node selector).
      service_account: the pods' KSA (Workload Identity for gs://); its token is not mounted.
      run_as_user: uid to run as; None for images that need root.
      service_ports: Service ports for (http, grpc, metrics); container ports stay 8000-8002.
      startup_seconds: how long a replica may take to load the model before liveness counts.
      spot: schedule on GKE spot nodes (the spot label and taint), as the cluster config says.
      ephemeral_storage: local disk to request (a quantity): Triton copies a gs:// model to a
        local temporary directory before loading it (triton-inference-server/core,
        filesystem LocalizePath), so the pod needs the model's size on its node's disk.
      owner: the RayCluster or RayJob the Deployment belongs to, as an ownerReference
        ({"apiVersion", "kind", "name", "uid"}): deleting it (or its crash and clean-up)
        garbage-collects the Deployment. None: no owner.
      mount_repository: mount the gs:// model_repository read-only with the Cloud Storage
        FUSE CSI driver at REPOSITORY_MOUNT and point tritonserver there (no local copy),
        instead of Triton reading gs:// itself.
    """

    model_name: str
    model_repository: str
    image: str
    namespace: str = "default"
    gpus: int = 1
    replicas: int = 1
    accelerator: str | None = None
    service_account: str | None = None
    run_as_user: int | None = 1000
    cpu: str | None = None
    memory: str | None = None
    service_ports: tuple[int, int, int] = (HTTP_PORT, GRPC_PORT, METRICS_PORT)
    startup_seconds: int = 600
    spot: bool = False
    ephemeral_storage: str | None = None
    owner: dict[str, str] | None = None
    mount_repository: bool = False

    @property
    def name(self) -> str:
        """The Deployment's and Service's name (object_name of the model)."""
        return object_name(self.model_name)


def object_name(model_name: str) -> str:
    """`triton-<model>` as a DNS-1035 label (Service names must start with a letter)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"model name {model_name!r} has no character usable in a "
                         f"Kubernetes name")
    return f"triton-{slug}"[:63].rstrip("-")


def _probe(path: str, period: int, failures: int) -> client.V1Probe:
    return client.V1Probe(http_get=client.V1HTTPGetAction(path=path, port="http"),
                          period_seconds=period, failure_threshold=failures, timeout_seconds=5)


def repository_volume(model_repository: str) -> tuple[client.V1Volume, client.V1VolumeMount]:
    """The gs:// MODEL_REPOSITORY as a read-only CSI ephemeral volume of the GCS FUSE driver.

    only-dir mounts just the repository's prefix; implicit-dirs shows folders that exist only
    as object-name prefixes (ours are written without folder placeholder objects). The pod's
    Kubernetes service account needs read access to the bucket (cluster/iam.py: Triton's roles).
    """
    bucket, prefix = split_gs_url(model_repository)
    options = ["implicit-dirs"] + ([f"only-dir={prefix}"] if prefix else [])
    volume = client.V1Volume(name="model-repository", csi=client.V1CSIVolumeSource(
        driver=GCSFUSE_DRIVER, read_only=True,
        volume_attributes={"bucketName": bucket, "mountOptions": ",".join(options)}))
    return volume, client.V1VolumeMount(name="model-repository", mount_path=REPOSITORY_MOUNT,
                                        read_only=True)


def deployment(spec: TritonSpec) -> dict:
    """Deployment: tritonserver loading only SPEC.model_name, probes on 8000."""
    selector = {**pods.labels(COMPONENT, spec.name)}
    shm, shm_mount = pods.shm_volume()
    volumes, mounts, annotations = [shm], [shm_mount], None
    repository = spec.model_repository
    if spec.mount_repository:
        volume, mount = repository_volume(spec.model_repository)
        volumes.append(volume)
        mounts.append(mount)
        annotations = {GCSFUSE_ANNOTATION: "true", **GCSFUSE_SIDECAR_LIMITS}
        repository = REPOSITORY_MOUNT
    node_selector, tolerations = (pods.gpu_scheduling(spec.accelerator, spec.spot)
                                  if spec.accelerator else (None, None))
    container = client.V1Container(
        name="tritonserver",
        image=spec.image,
        command=["tritonserver"],
        args=[f"--model-repository={repository}",
              "--model-control-mode=explicit", f"--load-model={spec.model_name}",
              "--strict-model-config=true", "--log-verbose=0",
              f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}",
              f"--metrics-port={METRICS_PORT}"],
        ports=[client.V1ContainerPort(container_port=HTTP_PORT, name="http"),
               client.V1ContainerPort(container_port=GRPC_PORT, name="grpc"),
               client.V1ContainerPort(container_port=METRICS_PORT, name="metrics")],
        resources=pods.resources(spec.cpu, spec.memory, spec.gpus, spec.ephemeral_storage),
        volume_mounts=mounts,
        # Loading 40 GB of weights takes minutes: the startup probe holds liveness off until
        # the server answers, then readiness (all models loaded) gates the Service.
        startup_probe=_probe("/v2/health/live", 10, max(1, spec.startup_seconds // 10)),
        liveness_probe=_probe("/v2/health/live", 10, 3),
        readiness_probe=_probe("/v2/health/ready", 5, 3),
        security_context=pods.container_security(spec.run_as_user),
    )
    dep = client.V1Deployment(
        api_version="apps/v1", kind="Deployment",
        metadata=_metadata(spec, selector),
        spec=client.V1DeploymentSpec(
            replicas=spec.replicas,
            # Each replica holds whole GPUs: a rolling update would need a second set of GPUs
            # for the surge pod, which a sized node pool does not have; replace instead.
            strategy=client.V1DeploymentStrategy(type="Recreate"),
            selector=client.V1LabelSelector(match_labels=selector),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=selector, annotations=annotations),
                spec=client.V1PodSpec(
                    containers=[container],
                    service_account_name=spec.service_account,
                    automount_service_account_token=False,
                    node_selector=node_selector,
                    tolerations=tolerations,
                    volumes=volumes,
                    security_context=pods.pod_security(spec.run_as_user),
                ),
            ),
        ),
    )
    return pods.to_dict(dep)


def _owner_references(spec: TritonSpec) -> list[client.V1OwnerReference] | None:
    # Not a controller reference and no blockOwnerDeletion: either would need update rights
    # on the owner's finalizers, which the Role does not grant.
    if spec.owner is None:
        return None
    return [client.V1OwnerReference(api_version=spec.owner["apiVersion"],
                                    kind=spec.owner["kind"], name=spec.owner["name"],
                                    uid=spec.owner["uid"])]


def _metadata(spec: TritonSpec, selector: dict[str, str]) -> client.V1ObjectMeta:
    """Name, namespace, labels and owner of the Deployment and the Service alike."""
    return client.V1ObjectMeta(name=spec.name, namespace=spec.namespace,
                               labels={**selector, "t5ft.model": _label(spec.model_name)},
                               owner_references=_owner_references(spec))


def service(spec: TritonSpec) -> dict:
    """ClusterIP Service in front of every replica: http, grpc, metrics."""
    selector = pods.labels(COMPONENT, spec.name)
    http, grpc, metrics = spec.service_ports
    svc = client.V1Service(
        api_version="v1", kind="Service",
        metadata=_metadata(spec, selector),
        spec=client.V1ServiceSpec(
            type="ClusterIP",
            selector=selector,
            ports=[client.V1ServicePort(name="http", port=http, target_port="http"),
                   client.V1ServicePort(name="grpc", port=grpc, target_port="grpc"),
                   client.V1ServicePort(name="metrics", port=metrics, target_port="metrics")],
        ),
    )
    return pods.to_dict(svc)


def endpoints(spec: TritonSpec) -> dict[str, str]:
    """The in-cluster addresses of the Service, as the serve ready line reports them."""
    host = f"{spec.name}.{spec.namespace}.svc.cluster.local"
    http, grpc, metrics = spec.service_ports
    return {"grpc": f"{host}:{grpc}", "http": f"{host}:{http}", "metrics": f"{host}:{metrics}"}


def _label(value: str) -> str:
    """A label value: 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:63].strip("_.-") or "model"
