"""Pod-level pieces every workload we render shares: non-root security, GPU scheduling, labels.

Pure functions returning `kubernetes.client` models; the renderers assemble them.
"""

from __future__ import annotations

from kubernetes import client

from cluster.config import ACCELERATOR_LABEL, GPU_RESOURCE, GPU_TAINT_KEY, SPOT_LABEL

MANAGED_BY = "t5x-ft-ray"


def labels(component: str, instance: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels; `instance` is the cluster or model name."""
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(match: dict[str, str]) -> str:
    """A label selector's string form ("k=v,k=v"), as the API's list calls take it."""
    return ",".join(f"{key}={value}" for key, value in match.items())


def pod_security(run_as_user: int | None) -> client.V1PodSecurityContext:
    """Non-root when the image has a non-root user (uid 1000 in Ray and Triton images).

    fsGroup 100 (`users` in rayproject/ray) makes mounted volumes writable for that user.
    """
    if run_as_user is None:
        return client.V1PodSecurityContext(
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"))
    return client.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=run_as_user,
        fs_group=100,
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def container_security(run_as_user: int | None) -> client.V1SecurityContext:
    """No privilege escalation and no Linux capabilities; non-root when a user is given."""
    return client.V1SecurityContext(
        allow_privilege_escalation=False,
        run_as_non_root=True if run_as_user is not None else None,
        capabilities=client.V1Capabilities(drop=["ALL"]),
    )


def gpu_scheduling(accelerator: str, spot: bool = False
                   ) -> tuple[dict[str, str], list[client.V1Toleration]]:
    """GKE GPU node pools: the accelerator label to select, and the GPU taint to tolerate.

    Both belong in the pod template's spec (a nodeSelector anywhere else is ignored:
    ray-project/ray #50298).
    """
    selector = {ACCELERATOR_LABEL: accelerator}
    tolerations = [client.V1Toleration(key=GPU_TAINT_KEY, operator="Exists",
                                       effect="NoSchedule")]
    if spot:
        selector[SPOT_LABEL] = "true"
        tolerations.append(client.V1Toleration(key=SPOT_LABEL, operator="Equal", value="true",
                                               effect="NoSchedule"))
    return selector, tolerations


def resources(cpu: str | None, memory: str | None, gpus: int = 0,
              ephemeral_storage: str | None = None) -> client.V1ResourceRequirements:
    """Requests equal to limits (Guaranteed QoS, and Ray reads its CPU count from the limit)."""
    amounts: dict[str, str] = {}
    if cpu:
        amounts["cpu"] = str(cpu)
    if memory:
        amounts["memory"] = str(memory)
    if ephemeral_storage:
        amounts["ephemeral-storage"] = str(ephemeral_storage)
    limits = dict(amounts)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    return client.V1ResourceRequirements(requests=amounts or None, limits=limits or None)


def shm_volume(name: str = "dshm") -> tuple[client.V1Volume, client.V1VolumeMount]:
    """A memory-backed /dev/shm: Ray's object store and NCCL both need more than the 64 MiB
    default."""
    return (client.V1Volume(name=name, empty_dir=client.V1EmptyDirVolumeSource(medium="Memory")),
            client.V1VolumeMount(name=name, mount_path="/dev/shm"))


def to_dict(obj) -> dict:
    """A client model as the API server's JSON (camelCase keys, no None fields)."""
    return client.ApiClient().sanitize_for_serialization(obj)
