"""KubeRay RayCluster and RayJob objects from a ClusterConfig (pure).

Pod templates are `kubernetes.client` models, so a misspelt field fails here rather than being
dropped by the API server; the CRD top level is a dict built around their serialised form
(`ApiClient().sanitize_for_serialization`), since the client has no models for CRDs.
Schemas: cluster/schemas/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml (KubeRay v1.7.0, ray.io/v1).
"""

from __future__ import annotations

import yaml
from kubernetes import client

from cluster import pods
from cluster.config import ClusterConfig, WorkerGroup

GROUP = "ray.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"

DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
GCS_PORT = 6379
METRICS_PORT = 8080

# What serving/kubernetes.py reads on the head to launch Triton as the cluster config says.
ENV_NAMESPACE = "T5FT_NAMESPACE"
ENV_TRITON_IMAGE = "T5FT_TRITON_IMAGE"
ENV_TRITON_SERVICE_ACCOUNT = "T5FT_TRITON_SERVICE_ACCOUNT"
ENV_TRITON_ACCELERATOR = "T5FT_TRITON_ACCELERATOR"
ENV_TRITON_RUN_AS_USER = "T5FT_TRITON_RUN_AS_USER"
ENV_TRITON_CPU = "T5FT_TRITON_CPU"
ENV_TRITON_MEMORY = "T5FT_TRITON_MEMORY"
ENV_TRITON_SPOT = "T5FT_TRITON_SPOT"
ENV_TRITON_BACKEND = "T5FT_TRITON_BACKEND"
ENV_TRITON_NODE_GPUS = "T5FT_TRITON_NODE_GPUS"
ENV_TRITON_REPOSITORY = "T5FT_TRITON_REPOSITORY"
# The object that owns the Triton Deployments serve creates (garbage-collected with it).
ENV_OWNER_KIND = "T5FT_OWNER_KIND"
ENV_OWNER_NAME = "T5FT_OWNER_NAME"

# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S seconds (3 by
# default). Ray 2.60 reads it from the job supervisor actor's os.environ
# (python/ray/dashboard/modules/job/job_supervisor.py, JobSupervisor.run), and that actor runs
# with the raylet's environment (the Ray container's env) plus the job's runtime_env env_vars
# (job_manager.py, _get_supervisor_runtime_env). We set it in both places: every Ray container
# (any `ray job submit`) and the RayJob's runtime env. The value covers serve's worst-case
# teardown under its retry and timeout settings (serving/kubernetes.stop_seconds_bound; a test
# checks that it fits); normally the teardown takes well under a second.
ENV_JOB_STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"
JOB_STOP_WAIT_S = 300


def _triton_env(cfg: ClusterConfig, owner: tuple[str, str]) -> list[client.V1EnvVar]:
    # The namespace comes from the downward API, so the same pod spec works if it is moved.
    env = [
        client.V1EnvVar(name=ENV_NAMESPACE, value_from=client.V1EnvVarSource(
            field_ref=client.V1ObjectFieldSelector(field_path="metadata.namespace"))),
        client.V1EnvVar(name=ENV_TRITON_IMAGE, value=cfg.triton.image),
        client.V1EnvVar(name=ENV_TRITON_SERVICE_ACCOUNT, value=cfg.service_accounts.triton),
        client.V1EnvVar(name=ENV_TRITON_RUN_AS_USER,
                        value="" if cfg.triton.run_as_user is None
                        else str(cfg.triton.run_as_user)),
        client.V1EnvVar(name=ENV_TRITON_SPOT, value="true" if cfg.triton_spot else "false"),
        client.V1EnvVar(name=ENV_TRITON_BACKEND, value=cfg.triton.backend),
        client.V1EnvVar(name=ENV_TRITON_REPOSITORY, value=cfg.triton.repository),
        client.V1EnvVar(name=ENV_OWNER_KIND, value=owner[0]),
        client.V1EnvVar(name=ENV_OWNER_NAME, value=owner[1]),
    ]
    if cfg.triton_node_gpus is not None:
        env.append(client.V1EnvVar(name=ENV_TRITON_NODE_GPUS, value=str(cfg.triton_node_gpus)))
    if cfg.triton_accelerator:
        env.append(client.V1EnvVar(name=ENV_TRITON_ACCELERATOR, value=cfg.triton_accelerator))
    if cfg.triton.cpu:
        env.append(client.V1EnvVar(name=ENV_TRITON_CPU, value=cfg.triton.cpu))
    if cfg.triton.memory:
        env.append(client.V1EnvVar(name=ENV_TRITON_MEMORY, value=cfg.triton.memory))
    return env


def _ray_volumes() -> tuple[list[client.V1Volume], list[client.V1VolumeMount]]:
    """A memory-backed /dev/shm (object store, NCCL) and /tmp/ray (logs, sockets) as emptyDirs."""
    shm, shm_mount = pods.shm_volume()
    logs = client.V1Volume(name="ray-logs", empty_dir=client.V1EmptyDirVolumeSource())
    return [shm, logs], [shm_mount, client.V1VolumeMount(name="ray-logs", mount_path="/tmp/ray")]


def _ray_pod_template(cfg: ClusterConfig, component: str, *, image: str,
                      resources: client.V1ResourceRequirements, mount_token: bool,
                      node_selector: dict[str, str] | None = None,
                      tolerations: list[client.V1Toleration] | None = None,
                      env: list[client.V1EnvVar] | None = None,
                      **container: object) -> client.V1PodTemplateSpec:
    """A Ray pod: one container named COMPONENT (also its app.kubernetes.io/name label).

    What every Ray pod shares is written here once: the Ray service account, the /dev/shm and
    /tmp/ray volumes, `ray stop` before the pod goes (so the node leaves the cluster cleanly
    rather than being declared dead), the non-root security contexts, and the job stop grace
    (JOB_STOP_WAIT_S: a job's supervisor runs on the head, or on any node when the job asks
    for entrypoint resources; Ray 2.60 job_manager.py, _get_label_selector).

    Args:
      cfg: the cluster config (name, service account, run_as_user).
      component: "ray-head" or "ray-worker".
      image, resources: the container's.
      mount_token: whether the pod gets the service account's Kubernetes token; only the head
        does, since only it launches Triton (the Role is bound to that account).
      node_selector, tolerations: GPU node-pool scheduling (pods.gpu_scheduling), or None.
      env: further environment variables (the head's T5FT_*).
      **container: further V1Container fields (ports).
    """
    volumes, mounts = _ray_volumes()
    ray_container = client.V1Container(
        name=component,
        image=image,
        resources=resources,
        volume_mounts=mounts,
        lifecycle=client.V1Lifecycle(pre_stop=client.V1LifecycleHandler(
            _exec=client.V1ExecAction(command=["/bin/sh", "-c", "ray stop"]))),
        security_context=pods.container_security(cfg.run_as_user),
        env=[client.V1EnvVar(name=ENV_JOB_STOP_WAIT, value=str(JOB_STOP_WAIT_S)), *(env or [])],
        **container,
    )
    return client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=pods.labels(component, cfg.name)),
        spec=client.V1PodSpec(
            service_account_name=cfg.service_accounts.ray,
            automount_service_account_token=mount_token,
            containers=[ray_container],
            volumes=volumes,
            node_selector=node_selector,
            tolerations=tolerations,
            security_context=pods.pod_security(cfg.run_as_user),
        ),
    )


def head_template(cfg: ClusterConfig, owner: tuple[str, str]) -> client.V1PodTemplateSpec:
    """The head pod: dashboard and job API, the Ray KSA (the only pod that mounts its token:
    it is the one that launches Triton), and the T5FT_* env that tells serve how; OWNER
    (kind, name) is the RayCluster or RayJob that Triton Deployments will belong to."""
    ports = [client.V1ContainerPort(container_port=GCS_PORT, name="gcs"),
             client.V1ContainerPort(container_port=DASHBOARD_PORT, name="dashboard"),
             client.V1ContainerPort(container_port=CLIENT_PORT, name="client"),
             client.V1ContainerPort(container_port=METRICS_PORT, name="metrics")]
    return _ray_pod_template(cfg, "ray-head", image=cfg.image,
                             resources=pods.resources(cfg.head.cpu, cfg.head.memory),
                             mount_token=True, ports=ports, env=_triton_env(cfg, owner))


def worker_template(cfg: ClusterConfig, group: WorkerGroup) -> client.V1PodTemplateSpec:
    """A worker pod. It shares the Ray KSA for Workload Identity (GCS) but does not mount its
    Kubernetes token, so the Role bound to that account is usable from the head only."""
    node_selector, tolerations = (pods.gpu_scheduling(group.accelerator, group.spot)
                                  if group.is_gpu else (None, None))
    resources = pods.resources(group.cpu, group.memory, group.gpus, group.ephemeral_storage)
    return _ray_pod_template(cfg, "ray-worker",
                             image=cfg.gpu_image if group.is_gpu else cfg.image,
                             resources=resources, mount_token=False,
                             node_selector=node_selector, tolerations=tolerations)


def raycluster_spec(cfg: ClusterConfig, owner: tuple[str, str] | None = None) -> dict:
    """`spec` of a RayCluster (also a RayJob's `rayClusterSpec`, OWNER then the RayJob)."""
    owner = owner or ("RayCluster", cfg.name)
    head_params = {"dashboard-host": "0.0.0.0"}
    if cfg.cpu_workers or cfg.gpu_workers:
        # Keep conversion tasks off the head: it runs the drivers and the dashboard.
        head_params["num-cpus"] = "0"
    spec: dict = {
        "rayVersion": cfg.ray_version,
        "enableInTreeAutoscaling": cfg.autoscaling.enabled,
        "headGroupSpec": {
            "serviceType": cfg.head.service_type,
            "rayStartParams": head_params,
            "template": pods.to_dict(head_template(cfg, owner)),
        },
        "workerGroupSpecs": [
            {
                "groupName": group.group,
                "replicas": group.replicas,
                "minReplicas": group.min_replicas,
                "maxReplicas": group.max_replicas,
                "rayStartParams": {},
                "template": pods.to_dict(worker_template(cfg, group)),
            }
            for group in cfg.worker_groups
        ],
    }
    # Ray token authentication (Ray >= 2.52, KubeRay >= 1.5.1): the operator makes a Secret
    # with a random token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container
    # (auth_secret below); `ray job submit` then needs RAY_AUTH_TOKEN (docs/gke.md).
    spec["authOptions"] = {"mode": "token"}
    spec["networkPolicy"] = network_policy(cfg)
    if cfg.autoscaling.enabled:
        spec["autoscalerOptions"] = {
            "upscalingMode": cfg.autoscaling.upscaling_mode,
            "idleTimeoutSeconds": cfg.autoscaling.idle_timeout_seconds,
            "securityContext": pods.to_dict(pods.container_security(cfg.run_as_user)),
        }
    return spec


# Google Managed Prometheus' collectors run in this namespace (they scrape the metrics port).
GMP_NAMESPACE = "gmp-system"


def _ingress_from_namespace(namespace: str | None, port: int) -> dict:
    """An ingress rule: TCP PORT from every pod of NAMESPACE (None: the pod's own namespace)."""
    peer: dict = {"podSelector": {}} if namespace is None else {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    return {"from": [peer], "ports": [{"protocol": "TCP", "port": port}]}


def network_policy(cfg: ClusterConfig) -> dict:
    """KubeRay's `networkPolicy` (v1.7.0 CRD): deny ingress except what is listed.

    KubeRay v1.7.0's NetworkPolicy controller lets in the cluster's own pods (and, for a RayJob
    in K8sJobMode, its submitter) and deliberately nothing else: "Operator access is
    intentionally omitted here" (ray-operator/controllers/ray/networkpolicy_controller.go,
    buildHeadIngressRules). So we add the head's dashboard/job API (8265) for pods of the head's
    own namespace (job submission, serve's drivers) and of the operator's namespace
    (config.kuberay_namespace: rayjob_controller.go polls the job's status through the
    dashboard; without it a RayJob's status never moves), and the metrics port for Managed
    Prometheus. Egress stays open: pods read GCS and the Kubernetes API.
    With head.service_type LoadBalancer or NodePort the user asked for the dashboard from
    outside the cluster, whose traffic matches no pod or namespace selector: 8265 is then
    open to every source (token authentication still guards it), or the address `up` prints
    would only time out.

    The field needs the operator's alpha RayClusterNetworkPolicy gate (cluster/kuberay.py);
    the setup script's Helm values turn it on and `python -m cluster doctor` checks it.
    """
    metrics = _ingress_from_namespace(GMP_NAMESPACE, METRICS_PORT)
    dashboard = [_ingress_from_namespace(None, DASHBOARD_PORT),
                 _ingress_from_namespace(cfg.kuberay_namespace, DASHBOARD_PORT)]
    if cfg.head.service_type != "ClusterIP":
        # A rule without `from` admits every source (networking.k8s.io/v1 NetworkPolicy).
        dashboard.append({"ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]})
    return {
        "mode": "DenyAllIngress",
        "head": {"ingressRules": [*dashboard, metrics]},
        "worker": {"ingressRules": [metrics]},
    }


def raycluster(cfg: ClusterConfig) -> dict:
    """The RayCluster object (ray.io/v1)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": {"name": cfg.name, "namespace": cfg.namespace,
                     "labels": pods.labels("ray", cfg.name)},
        "spec": raycluster_spec(cfg),
    }


# The key of the token in the operator's Secret: ray-operator/controllers/ray/utils/constant.go
# (RAY_AUTH_TOKEN_SECRET_KEY) at ray-project/kuberay@v1.7.0.
AUTH_TOKEN_KEY = "auth_token"


def auth_secret(raycluster_name: str) -> str:
    """The Secret holding a RayCluster's Ray auth token, as the KubeRay operator names it.

    ray-project/kuberay@v1.7.0, ray-operator/controllers/ray/raycluster_controller.go
    (reconcileAuthSecret: `utils.CheckName(instance.Name)`) and utils/util.go (CheckName: the
    last 50 characters; a leading digit or punctuation becomes "r"). The operator stores a
    random base64 token under AUTH_TOKEN_KEY and gives every Ray container RAY_AUTH_MODE=token
    and RAY_AUTH_TOKEN from it (common/pod.go, SetContainerTokenAuthEnvVars), which is where
    Ray reads its token. A RayJob's cluster is named `<rayjob>-<5 random characters>`
    (utils.GenerateRayClusterName): its Secret is named after status.rayClusterName.
    """
    name = raycluster_name[-50:]
    if name[0].isdigit() or not name[0].isalnum():
        name = "r" + name[1:]
    return name


def token_command(namespace: str, raycluster_name: str) -> str:
    """The shell line that exports the token `ray job submit` needs for this cluster."""
    return (f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(kubectl -n {namespace} get secret "
            f"{auth_secret(raycluster_name)} -o jsonpath='{{.data.{AUTH_TOKEN_KEY}}}' "
            f"| base64 -d)")


def rayjob_name(cfg: ClusterConfig) -> str:
    """The RayJob's name: the cluster's, suffixed, so a RayJob and a RayCluster can coexist."""
    return f"{cfg.name}-job"


def rayjob(cfg: ClusterConfig, entrypoint: str, runtime_env: dict | None = None,
           ttl_seconds: int = 600, deadline: int | None = None) -> dict:
    """A one-shot RayJob: its own cluster, ENTRYPOINT run once, cluster deleted after.

    The code comes from the image (config.image: docker/ray.Dockerfile installs this package):
    unlike `ray job submit --working-dir .`, a RayJob uploads nothing from this machine.
    RUNTIME_ENV: the job's runtime env (e.g. env_vars); job_runtime_env adds the stop grace.
    DEADLINE: activeDeadlineSeconds, after which KubeRay fails the job (None: no deadline).
    """
    if not entrypoint.strip():
        raise ValueError("the RayJob entrypoint is empty")
    submitter = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=pods.labels("ray-job-submitter", cfg.name)),
        spec=client.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            containers=[client.V1Container(
                name="ray-job-submitter", image=cfg.image,
                resources=pods.resources("500m", "512Mi"),
                security_context=pods.container_security(cfg.run_as_user))],
            security_context=pods.pod_security(cfg.run_as_user),
        ),
    )
    spec: dict = {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl_seconds,
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": pods.to_dict(submitter),
        "rayClusterSpec": raycluster_spec(cfg, ("RayJob", rayjob_name(cfg))),
    }
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    spec["runtimeEnvYAML"] = yaml.safe_dump(job_runtime_env(runtime_env), sort_keys=True)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": rayjob_name(cfg), "namespace": cfg.namespace,
                     "labels": pods.labels("ray-job", cfg.name)},
        "spec": spec,
    }


def job_runtime_env(runtime_env: dict | None = None) -> dict:
    """RUNTIME_ENV with env_vars.RAY_JOB_STOP_WAIT_TIME_S = JOB_STOP_WAIT_S unless it sets it.

    The supervisor that enforces `ray job stop`'s grace reads the job's env_vars too (see
    ENV_JOB_STOP_WAIT), so the grace holds even on a cluster whose pods lack it.
    """
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    env_vars.setdefault(ENV_JOB_STOP_WAIT, str(JOB_STOP_WAIT_S))
    env["env_vars"] = env_vars
    return env


def dashboard_url(cfg: ClusterConfig, external_host: str | None = None) -> str:
    """Where `ray job submit --address` points: the head Service, in-cluster DNS by default."""
    host = external_host or f"{cfg.head_service}.{cfg.namespace}.svc.cluster.local"
    return f"http://{host}:{DASHBOARD_PORT}"
