"""Namespace, service accounts and the least-privilege Role for the Ray head (pure).

The Ray head launches Triton (serving/kubernetes.py) and needs, in its own namespace only:
deployments (apps) and services: get, list, watch, create, patch, delete; pods: get, list, watch
(the Deployment's ReplicaSet creates them, never we); pods/log get; events list (to say why a
Triton pod is pending); serviceaccounts get (serve checks Triton's account exists before it
creates anything); rayclusters and rayjobs (ray.io) get (the owner of the Triton objects).
A Role and a RoleBinding; never a ClusterRole or ClusterRoleBinding (tests/cluster checks every
rendered object for that).

The namespace carries Pod Security Admission labels (pod_security_level): `restricted` when
every pod we render meets that profile (tests/cluster/test_gke.py checks it rule by rule), which
holds whenever both Ray and Triton run as a non-root uid; `baseline` when the config runs an
image as root (run_as_user: null), since `restricted` requires runAsNonRoot.

Both service accounts carry the Workload Identity annotation, so pods reach GCS as the Google
service account without key files. The KubeRay operator adds its own Role for the in-tree
autoscaler (pods, rayclusters) to the head's account when autoscaling is on; that one is the
operator's, not rendered here.
"""

from __future__ import annotations

from kubernetes import client

from cluster import pods
from cluster.config import WORKLOAD_IDENTITY_ANNOTATION, ClusterConfig

LAUNCH_VERBS = ["get", "list", "watch", "create", "patch", "delete"]
READ_VERBS = ["get", "list", "watch"]


def pod_security_level(cfg: ClusterConfig) -> tuple[str, str]:
    """(level, reason): the Pod Security Standards level every pod of CFG meets.

    https://kubernetes.io/docs/concepts/security/pod-security-standards/: `restricted` needs
    runAsNonRoot on every container, which a root image (run_as_user: null) cannot have.
    """
    if cfg.triton.run_as_user is None:
        return "baseline", "an image runs as root (run_as_user: null): restricted needs " \
            "runAsNonRoot"
    return "restricted", "every pod runs as a non-root uid with the restricted profile's fields"


def psa_labels(cfg: ClusterConfig) -> dict[str, str]:
    """The namespace's Pod Security Admission labels (enforce, audit and warn at one level;
    https://kubernetes.io/docs/concepts/security/pod-security-admission/)."""
    level, _ = pod_security_level(cfg)
    return {f"pod-security.kubernetes.io/{mode}": level for mode in ("enforce", "audit", "warn")}


def role_name(cfg: ClusterConfig) -> str:
    """The Role and RoleBinding's name (`down` deletes them by it)."""
    return f"{cfg.name}-triton-launcher"


def namespace(cfg: ClusterConfig) -> dict:
    """The Namespace object (applied only when config.create_namespace)."""
    return pods.to_dict(client.V1Namespace(
        api_version="v1", kind="Namespace",
        metadata=client.V1ObjectMeta(name=cfg.namespace,
                                     labels={**pods.labels("ray", cfg.name), **psa_labels(cfg)})))


def google_service_accounts(cfg: ClusterConfig) -> dict[str, str]:
    """KSA name -> the Google service account it acts as (Workload Identity): the Ray account
    the read-write runner, the Triton account the read-only one (when the config has it)."""
    accounts = cfg.service_accounts
    return {accounts.ray: accounts.google_service_account, accounts.triton: accounts.triton_gsa}


def service_account(cfg: ClusterConfig, name: str) -> dict:
    """A ServiceAccount NAME bound to its Google service account through Workload Identity."""
    return pods.to_dict(client.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount",
        metadata=client.V1ObjectMeta(
            name=name, namespace=cfg.namespace, labels=pods.labels("ray", cfg.name),
            annotations={WORKLOAD_IDENTITY_ANNOTATION: google_service_accounts(cfg)[name]})))


def launch_rules() -> list[client.V1PolicyRule]:
    """Exactly what launching and watching Triton takes."""
    return [
        client.V1PolicyRule(api_groups=["apps"], resources=["deployments"], verbs=LAUNCH_VERBS),
        client.V1PolicyRule(api_groups=[""], resources=["services"], verbs=LAUNCH_VERBS),
        client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=READ_VERBS),
        client.V1PolicyRule(api_groups=[""], resources=["pods/log"], verbs=["get"]),
        client.V1PolicyRule(api_groups=[""], resources=["events"], verbs=["list"]),
        client.V1PolicyRule(api_groups=[""], resources=["serviceaccounts"], verbs=["get"]),
        client.V1PolicyRule(api_groups=["ray.io"], resources=["rayclusters", "rayjobs"],
                            verbs=["get"]),
    ]


def role(cfg: ClusterConfig) -> dict:
    """The namespaced Role granting launch_rules() (never a ClusterRole)."""
    return pods.to_dict(client.V1Role(
        api_version="rbac.authorization.k8s.io/v1", kind="Role",
        metadata=client.V1ObjectMeta(name=role_name(cfg), namespace=cfg.namespace,
                                     labels=pods.labels("ray", cfg.name)),
        rules=launch_rules()))


def role_binding(cfg: ClusterConfig) -> dict:
    """Binds the Role to the Ray service account only; the Triton account gets no rights."""
    return pods.to_dict(client.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding",
        metadata=client.V1ObjectMeta(name=role_name(cfg), namespace=cfg.namespace,
                                     labels=pods.labels("ray", cfg.name)),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                  name=role_name(cfg)),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=cfg.service_accounts.ray,
                                       namespace=cfg.namespace)]))


def access_objects(cfg: ClusterConfig) -> list[dict]:
    """Everything `up` creates before the RayCluster, in dependency order."""
    objs = [namespace(cfg)] if cfg.create_namespace else []
    objs += [service_account(cfg, cfg.service_accounts.ray),
             service_account(cfg, cfg.service_accounts.triton),
             role(cfg), role_binding(cfg)]
    return objs
