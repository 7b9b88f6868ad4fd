"""Apply, read and delete our objects through the Kubernetes API, thinly.

One class, `Kube`, over the typed clients (CoreV1Api, AppsV1Api, RbacAuthorizationV1Api,
CustomObjectsApi). Objects go in and come out as plain dicts (the API's JSON), which is what
the renderers produce and what cluster/diagnose.py reads.

Decisions, so that `up` and `serve` can be re-run safely:
- create answered 409 (already exists): PATCH the existing object with the rendered one
  (strategic merge for built-in kinds, JSON merge for RayCluster/RayJob), so a re-run applies
  config changes; a Namespace that exists is left as it is.
- 429 and 5xx, and connection errors: retried with exponential backoff (`retries` times),
  through tenacity.
- 403: one line naming the verb, the resource and the namespace, and the Role that grants it.
- 404 on read/delete: None / False, not an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import tenacity
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from cluster.config import KUBERAY_CHART_VERSION
from core.errors import UserError

LOG = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class KubeApiError(UserError):
    """A Kubernetes API call failed for good; the message is one line."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Kind:
    """How the client reaches one kind: its typed API class and that class's five verbs.

    The verbs are the API class's own (unbound) methods, named here once, so that a kind we do
    not know, or a method the client does not have, fails at import rather than at the call.
    Every method is called with keyword arguments only, which is what lets one `Kube._call`
    serve all of them: `scope` (below) supplies the namespace (and, for a CRD, its group,
    version and plural), each verb adds `name` and `body` as it needs.

    Why not the dynamic client or server-side apply: tests/cluster/test_api.py asserts the
    merge-patch content types on the wire (`application/strategic-merge-patch+json` for built-in
    kinds, `application/merge-patch+json` for RayCluster/RayJob), and the recording FakeKubeAPI
    of tests/cluster/conftest.py serves no discovery (/apis), which the dynamic client needs.
    """

    api: type  # client.CoreV1Api | AppsV1Api | RbacAuthorizationV1Api | CustomObjectsApi | ...
    resource: str  # RBAC resource name, as a Role would grant it (e.g. "deployments.apps")
    create: Callable[..., Any]
    get: Callable[..., Any]
    patch: Callable[..., Any]
    delete: Callable[..., Any]
    list: Callable[..., Any]
    namespaced: bool = True
    crd: tuple[str, str, str] | None = None  # (group, version, plural) of a custom resource

    def scope(self, namespace: str | None) -> dict[str, str | None]:
        """The keyword arguments that place a call: CRD coordinates and/or the namespace."""
        if self.crd is not None:
            group, version, plural = self.crd
            return {"group": group, "version": version, "plural": plural, "namespace": namespace}
        return {"namespace": namespace} if self.namespaced else {}

    @property
    def patch_type(self) -> str:
        """The PATCH content type for this kind (strategic merge, or JSON merge for CRDs)."""
        # The API server does not know a CRD's schema for strategic merge: JSON merge there.
        return MERGE_PATCH if self.crd is not None else STRATEGIC_MERGE_PATCH


_CORE, _APPS = client.CoreV1Api, client.AppsV1Api
_RBAC, _CUSTOM = client.RbacAuthorizationV1Api, client.CustomObjectsApi


def _custom(plural: str, group: str = "ray.io", version: str = "v1") -> Kind:
    """A custom kind (KubeRay's ray.io/v1 by default), reached through CustomObjectsApi."""
    return Kind(_CUSTOM, f"{plural}.{group}", _CUSTOM.create_namespaced_custom_object,
                _CUSTOM.get_namespaced_custom_object, _CUSTOM.patch_namespaced_custom_object,
                _CUSTOM.delete_namespaced_custom_object, _CUSTOM.list_namespaced_custom_object,
                crd=(group, version, plural))


# Who installs each custom kind's CRD, for the error when the API does not know it.
_CRD_SOURCE = {
    "ray.io": "the KubeRay operator installed with its CRDs? (helm install kuberay-operator "
              f"kuberay/kuberay-operator --version {KUBERAY_CHART_VERSION})",
    "monitoring.googleapis.com": "Google Cloud Managed Service for Prometheus enabled on the "
                                 "cluster? (gcloud container clusters update CLUSTER "
                                 "--enable-managed-prometheus)",
}


KINDS: dict[str, Kind] = {
    "Namespace": Kind(
        _CORE, "namespaces", _CORE.create_namespace, _CORE.read_namespace,
        _CORE.patch_namespace, _CORE.delete_namespace, _CORE.list_namespace, namespaced=False),
    "ServiceAccount": Kind(
        _CORE, "serviceaccounts", _CORE.create_namespaced_service_account,
        _CORE.read_namespaced_service_account, _CORE.patch_namespaced_service_account,
        _CORE.delete_namespaced_service_account, _CORE.list_namespaced_service_account),
    "Service": Kind(
        _CORE, "services", _CORE.create_namespaced_service, _CORE.read_namespaced_service,
        _CORE.patch_namespaced_service, _CORE.delete_namespaced_service,
        _CORE.list_namespaced_service),
    "Pod": Kind(
        _CORE, "pods", _CORE.create_namespaced_pod, _CORE.read_namespaced_pod,
        _CORE.patch_namespaced_pod, _CORE.delete_namespaced_pod, _CORE.list_namespaced_pod),
    "Event": Kind(
        _CORE, "events", _CORE.create_namespaced_event, _CORE.read_namespaced_event,
        _CORE.patch_namespaced_event, _CORE.delete_namespaced_event,
        _CORE.list_namespaced_event),
    "Deployment": Kind(
        _APPS, "deployments.apps", _APPS.create_namespaced_deployment,
        _APPS.read_namespaced_deployment, _APPS.patch_namespaced_deployment,
        _APPS.delete_namespaced_deployment, _APPS.list_namespaced_deployment),
    "Role": Kind(
        _RBAC, "roles.rbac.authorization.k8s.io", _RBAC.create_namespaced_role,
        _RBAC.read_namespaced_role, _RBAC.patch_namespaced_role, _RBAC.delete_namespaced_role,
        _RBAC.list_namespaced_role),
    "RoleBinding": Kind(
        _RBAC, "rolebindings.rbac.authorization.k8s.io", _RBAC.create_namespaced_role_binding,
        _RBAC.read_namespaced_role_binding, _RBAC.patch_namespaced_role_binding,
        _RBAC.delete_namespaced_role_binding, _RBAC.list_namespaced_role_binding),
    # Read only (python -m cluster doctor checks the KubeRay CRDs' versions and fields).
    "CustomResourceDefinition": Kind(
        client.ApiextensionsV1Api, "customresourcedefinitions.apiextensions.k8s.io",
        client.ApiextensionsV1Api.create_custom_resource_definition,
        client.ApiextensionsV1Api.read_custom_resource_definition,
        client.ApiextensionsV1Api.patch_custom_resource_definition,
        client.ApiextensionsV1Api.delete_custom_resource_definition,
        client.ApiextensionsV1Api.list_custom_resource_definition, namespaced=False),
    "RayCluster": _custom("rayclusters"),
    "RayJob": _custom("rayjobs"),
    "PodMonitoring": _custom("podmonitorings", "monitoring.googleapis.com"),
}


def _check_kubeconfig(path: str) -> None:
    """Refuse, naming it, a --kubeconfig that is not a YAML mapping of clusters/contexts/users
    (the client library reports such a file as a parser's or a TypeError's words alone)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise UserError(f"--kubeconfig {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--kubeconfig {path} is not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not any(k in doc for k in ("clusters", "contexts")):
        raise UserError(f"--kubeconfig {path} is not a kubeconfig (a YAML mapping with "
                        "clusters, contexts and users)")


def new_api_client(kubeconfig: str | None = None, context: str | None = None
                   ) -> client.ApiClient:
    """An ApiClient from KUBECONFIG's file if given, else in-cluster, else ~/.kube/config.

    Its connection pool makes one attempt per request (urllib3's own retries, 3 by default, are
    off): Kube retries with tenacity, so that its retries and request timeout are the whole
    story of how long a call can take (Kube.call_seconds_bound).
    Raises UserError (one line) when none of them yields usable credentials.
    """
    configuration = client.Configuration()
    if kubeconfig:
        _check_kubeconfig(kubeconfig)
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                config.load_kube_config(context=context, client_configuration=configuration)
    except (ConfigException, OSError, TypeError) as exc:
        where = kubeconfig or "in-cluster config or ~/.kube/config (KUBECONFIG)"
        raise UserError(f"no usable Kubernetes credentials from {where}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from exc
    configuration.retries = False
    return client.ApiClient(configuration)


class Kube:
    """Our verbs on the API, with the retry and error rules above.

    Args:
      api_client: from new_api_client() or a kubernetes.client.ApiClient of your own.
      retries: extra attempts on 429/5xx/connection errors.
      backoff: first wait in seconds; doubled each attempt.
      request_timeout: seconds one HTTP request may take (connect and read) before it counts
        as a connection error (retried); None: no limit, the client's default.
    """

    def __init__(self, api_client: client.ApiClient, retries: int = 5, backoff: float = 0.5,
                 request_timeout: float | None = None):
        self.api_client = api_client
        self.retries = retries
        self.backoff = backoff
        self.request_timeout = request_timeout
        self._apis: dict[type, Any] = {}

    def call_seconds_bound(self) -> float:
        """The longest one verb can take: every attempt timing out, plus the backoff waits
        between them (math.inf without a request_timeout)."""
        if self.request_timeout is None:
            return math.inf
        waits = sum(self.backoff * 2 ** i for i in range(self.retries))
        return (self.retries + 1) * self.request_timeout + waits

    @property
    def host(self) -> str:
        """The API server's URL, for error messages."""
        return self.api_client.configuration.host

    # -- the verbs ------------------------------------------------------------------------

    def create(self, obj: dict) -> dict:
        """POST OBJ (a dict with kind and metadata.name); returns the created object."""
        kind, name, ns = _identify(obj)
        k = KINDS[kind]
        return self._call(k.create, "create", k, ns, name, body=obj)

    def patch(self, obj: dict) -> dict:
        """PATCH the existing object named by OBJ with OBJ itself (see Kind.patch_type)."""
        kind, name, ns = _identify(obj)
        k = KINDS[kind]
        return self._call(k.patch, "patch", k, ns, name, name=name, body=obj,
                          _content_type=k.patch_type)

    def apply(self, obj: dict) -> tuple[str, dict]:
        """Create OBJ, or patch it when it exists; returns ("created"|"patched"|"exists", obj)."""
        try:
            return "created", self.create(obj)
        except KubeApiError as exc:
            if exc.status != 409:
                raise
        if obj["kind"] == "Namespace":
            return "exists", obj
        return "patched", self.patch(obj)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """The object as the API's JSON, or None when it does not exist (404)."""
        k = KINDS[kind]
        try:
            return self._call(k.get, "get", k, namespace, name, name=name)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict]:
        """The items of KIND in NAMESPACE matching the selectors (each left out when None)."""
        k = KINDS[kind]
        selectors = {key: value for key, value in (("label_selector", label_selector),
                                                  ("field_selector", field_selector)) if value}
        return self._call(k.list, "list", k, namespace, None, **selectors).get("items") or []

    def delete(self, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete, letting dependents (ReplicaSets, pods) go in the background.

        Returns False when there was nothing to delete (404).
        """
        k = KINDS[kind]
        try:
            self._call(k.delete, "delete", k, namespace, name, name=name,
                       body={"propagationPolicy": "Background"})
            return True
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _api(self, k: Kind) -> Any:
        # One instance per API class, all sharing this Kube's ApiClient (its connection pool).
        if k.api not in self._apis:
            self._apis[k.api] = k.api(self.api_client)
        return self._apis[k.api]

    def _call(self, method: Callable[..., Any], verb: str, k: Kind, namespace: str | None,
              subject: str | None, **kwargs: Any) -> dict:
        """Call METHOD on K's API with tenacity's retry; the JSON body as a dict.

        VERB, NAMESPACE and SUBJECT (the object's name, None for a list) are for messages;
        KWARGS go to METHOD after K's scope.

        `_preload_content=False` keeps the client from deserialising into its models: we want the
        API's JSON as it is (and CRDs have no models anyway).
        """
        what = f"{k.resource}/{subject}" if subject else k.resource
        where = f" in namespace {namespace!r}" if k.namespaced else ""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retries + 1),
            # backoff * 2**(attempt - 1): the first wait is `backoff`, then it doubles.
            wait=tenacity.wait_exponential(multiplier=self.backoff, exp_base=2, min=0),
            retry=tenacity.retry_if_exception(_transient),
            before_sleep=lambda state: self._note(state, f"{verb} {what}"),
            reraise=True)
        if self.request_timeout is not None:
            kwargs["_request_timeout"] = self.request_timeout
        try:
            response = retrying(method, self._api(k), **k.scope(namespace), **kwargs,
                                _preload_content=False)
            # The body is read here, under the same request timeout: a stall is one line too.
            data = response.data if hasattr(response, "data") else response
        except ApiException as exc:
            raise _api_error(exc, verb, k, what, namespace, where, self.host) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise KubeApiError(f"cannot reach the Kubernetes API at {self.host} to {verb} "
                               f"{what}{where}: {type(exc).__name__}") from exc
        return json.loads(data) if data else {}

    def _note(self, state: tenacity.RetryCallState, action: str) -> None:
        """Say on the log which call failed how, and when it is tried again."""
        exc = state.outcome.exception() if state.outcome else None
        cause = f"HTTP {exc.status}" if isinstance(exc, ApiException) else type(exc).__name__
        delay = state.next_action.sleep if state.next_action else 0.0
        LOG.info("kubernetes: %s: %s; retrying in %.1fs (%d/%d)", action, cause, delay,
                 state.attempt_number, self.retries)


def _transient(exc: BaseException) -> bool:
    """Worth another attempt: throttling (429), a server-side 5xx, or no connection at all."""
    if isinstance(exc, ApiException):
        return exc.status in RETRY_STATUSES
    return isinstance(exc, urllib3.exceptions.HTTPError)


def _identify(obj: dict) -> tuple[str, str, str | None]:
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ValueError(f"cannot apply kind {kind!r}; known kinds: {', '.join(KINDS)}")
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        raise ValueError(f"{kind} has no metadata.name")
    return kind, meta["name"], meta.get("namespace")


def _server_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", "") if exc.body else ""
    except (ValueError, AttributeError):
        return str(exc.body)[:200] if exc.body else ""


def _api_error(exc: ApiException, verb: str, k: Kind, what: str, namespace: str | None,
               where: str, host: str) -> KubeApiError:
    message = " ".join(_server_message(exc).split())
    if exc.status == 403:
        scope = (f"a Role in namespace {namespace!r}" if k.namespaced
                 else "a ClusterRole (cluster-scoped resource)")
        return KubeApiError(
            f"forbidden: cannot {verb} {k.resource}{where} ({message or 'no reason given'}); "
            f"grant {verb} on {k.resource} with {scope} bound to this service account "
            f"(`python -m cluster render` prints the Role the Ray head needs)", 403)
    if exc.status == 404 and verb == "create" and k.crd is not None:
        return KubeApiError(f"cannot create {what}{where}: the API has no {k.resource} "
                            f"(HTTP 404); is {_CRD_SOURCE[k.crd[0]]}", 404)
    if exc.status == 401:
        return KubeApiError(f"unauthorized: the Kubernetes API at {host} rejected our "
                            f"credentials when trying to {verb} {what}{where}", 401)
    return KubeApiError(f"{verb} {what}{where} failed: HTTP {exc.status} {exc.reason}"
                        f"{': ' + message if message else ''}", exc.status)
