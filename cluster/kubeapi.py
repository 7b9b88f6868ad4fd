"""Apply, read and delete our objects through the Kubernetes API, thinly.

One class, `Kube`, over the typed clients (CoreV1Api, AppsV1Api, RbacAuthorizationV1Api,
CustomObjectsApi). Objects go in and come out as plain dicts (the API's JSON), which is what
the renderers produce and what cluster/diagnose.py reads.

Decisions, so that `up` and `serve` can be re-run safely:
- create answered 409 (already exists): PATCH the existing object with the rendered one
  (strategic merge for built-in kinds, JSON merge for RayCluster/RayJob), so a re-run applies
  config changes; a Namespace that exists is left as it is.
- 429 and 5xx, and connection errors: retried with exponential backoff (`retries` times).
- 403: one line naming the verb, the resource and the namespace, and the Role that grants it.
- 404 on read/delete: None / False, not an error.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from core.errors import UserError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class KubeApiError(UserError):
    """A Kubernetes API call failed for good; the message is one line."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Kind:
    """How the client reaches one kind: the typed API and its method stem, or a CRD plural."""

    api: str  # CoreV1Api | AppsV1Api | RbacAuthorizationV1Api | CustomObjectsApi
    stem: str  # e.g. "namespaced_deployment"; the CRD plural for CustomObjectsApi
    resource: str  # RBAC resource name, as a Role would grant it (e.g. "deployments.apps")
    namespaced: bool = True
    group: str = ""
    version: str = "v1"


KINDS: dict[str, Kind] = {
    "Namespace": Kind("CoreV1Api", "namespace", "namespaces", namespaced=False),
    "ServiceAccount": Kind("CoreV1Api", "namespaced_service_account", "serviceaccounts"),
    "Service": Kind("CoreV1Api", "namespaced_service", "services"),
    "Pod": Kind("CoreV1Api", "namespaced_pod", "pods"),
    "Event": Kind("CoreV1Api", "namespaced_event", "events"),
    "Deployment": Kind("AppsV1Api", "namespaced_deployment", "deployments.apps"),
    "Role": Kind("RbacAuthorizationV1Api", "namespaced_role",
                 "roles.rbac.authorization.k8s.io"),
    "RoleBinding": Kind("RbacAuthorizationV1Api", "namespaced_role_binding",
                        "rolebindings.rbac.authorization.k8s.io"),
    "RayCluster": Kind("CustomObjectsApi", "rayclusters", "rayclusters.ray.io", group="ray.io"),
    "RayJob": Kind("CustomObjectsApi", "rayjobs", "rayjobs.ray.io", group="ray.io"),
}


def new_api_client(kubeconfig: str | None = None, context: str | None = None
                   ) -> client.ApiClient:
    """An ApiClient from KUBECONFIG's file if given, else in-cluster, else ~/.kube/config."""
    try:
        if kubeconfig:
            return config.new_client_from_config(config_file=kubeconfig, context=context)
        try:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except ConfigException:
            return config.new_client_from_config(context=context)
    except (ConfigException, OSError, TypeError) as exc:
        where = kubeconfig or "in-cluster config or ~/.kube/config (KUBECONFIG)"
        raise UserError(f"no usable Kubernetes credentials from {where}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from exc


class Kube:
    """Our verbs on the API, with the retry and error rules above.

    Args:
      api_client: from new_api_client() or a kubernetes.client.ApiClient of your own.
      retries: extra attempts on 429/5xx/connection errors.
      backoff: first wait in seconds; doubled each attempt.
      log: where retry notes go (stderr by default); None for silence.
    """

    def __init__(self, api_client: client.ApiClient, retries: int = 5, backoff: float = 0.5,
                 log: Callable[[str], None] | None = lambda msg: print(msg, file=sys.stderr)):
        self.api_client = api_client
        self.retries = retries
        self.backoff = backoff
        self.log = log
        self._apis: dict[str, Any] = {}

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    # -- the verbs ------------------------------------------------------------------------

    def create(self, obj: dict) -> dict:
        kind, name, ns = _identify(obj)
        k = KINDS[kind]
        if k.api == "CustomObjectsApi":
            call = lambda: self._api(k).create_namespaced_custom_object(  # noqa: E731
                k.group, k.version, ns, k.stem, obj, _preload_content=False)
        else:
            args = (ns, obj) if k.namespaced else (obj,)
            call = lambda: getattr(self._api(k), f"create_{k.stem}")(  # noqa: E731
                *args, _preload_content=False)
        return self._call(call, "create", k, ns, name)

    def patch(self, obj: dict) -> dict:
        kind, name, ns = _identify(obj)
        k = KINDS[kind]
        if k.api == "CustomObjectsApi":
            call = lambda: self._api(k).patch_namespaced_custom_object(  # noqa: E731
                k.group, k.version, ns, k.stem, name, obj,
                _content_type="application/merge-patch+json", _preload_content=False)
        else:
            args = (name, ns, obj) if k.namespaced else (name, obj)
            call = lambda: getattr(self._api(k), f"patch_{k.stem}")(  # noqa: E731
                *args, _content_type="application/strategic-merge-patch+json",
                _preload_content=False)
        return self._call(call, "patch", k, ns, name)

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
        k = KINDS[kind]
        if k.api == "CustomObjectsApi":
            call = lambda: self._api(k).get_namespaced_custom_object(  # noqa: E731
                k.group, k.version, namespace, k.stem, name, _preload_content=False)
        else:
            args = (name, namespace) if k.namespaced else (name,)
            call = lambda: getattr(self._api(k), f"read_{k.stem}")(  # noqa: E731
                *args, _preload_content=False)
        try:
            return self._call(call, "get", k, namespace, name)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, label_selector: str | None = None,
             field_selector: str | None = None) -> list[dict]:
        k = KINDS[kind]
        opts = {key: value for key, value in (("label_selector", label_selector),
                                             ("field_selector", field_selector)) if value}
        if k.api == "CustomObjectsApi":
            call = lambda: self._api(k).list_namespaced_custom_object(  # noqa: E731
                k.group, k.version, namespace, k.stem, _preload_content=False, **opts)
        else:
            call = lambda: getattr(self._api(k), f"list_{k.stem}")(  # noqa: E731
                namespace, _preload_content=False, **opts)
        return self._call(call, "list", k, namespace, None).get("items") or []

    def delete(self, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete, letting dependents (ReplicaSets, pods) go in the background."""
        k = KINDS[kind]
        body = {"propagationPolicy": "Background"}
        if k.api == "CustomObjectsApi":
            call = lambda: self._api(k).delete_namespaced_custom_object(  # noqa: E731
                k.group, k.version, namespace, k.stem, name, body=body, _preload_content=False)
        else:
            args = (name, namespace) if k.namespaced else (name,)
            call = lambda: getattr(self._api(k), f"delete_{k.stem}")(  # noqa: E731
                *args, body=body, _preload_content=False)
        try:
            self._call(call, "delete", k, namespace, name)
            return True
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _api(self, k: Kind):
        if k.api not in self._apis:
            self._apis[k.api] = getattr(client, k.api)(self.api_client)
        return self._apis[k.api]

    def _call(self, call: Callable[[], Any], verb: str, k: Kind, namespace: str | None,
              name: str | None) -> dict:
        what = f"{k.resource}/{name}" if name else k.resource
        where = f" in namespace {namespace!r}" if k.namespaced else ""
        for attempt in range(self.retries + 1):
            try:
                response = call()
                data = response.data if hasattr(response, "data") else response
                return json.loads(data) if data else {}
            except ApiException as exc:
                if exc.status in RETRY_STATUSES and attempt < self.retries:
                    self._wait(attempt, f"{verb} {what}: HTTP {exc.status}")
                    continue
                raise _api_error(exc, verb, k, what, namespace, where, self.host) from exc
            except urllib3.exceptions.HTTPError as exc:
                if attempt < self.retries:
                    self._wait(attempt, f"{verb} {what}: {type(exc).__name__}")
                    continue
                raise KubeApiError(f"cannot reach the Kubernetes API at {self.host} to {verb} "
                                   f"{what}{where}: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, note: str) -> None:
        delay = self.backoff * (2 ** attempt)
        if self.log:
            self.log(f"kubernetes: {note}; retrying in {delay:.1f}s "
                     f"({attempt + 1}/{self.retries})")
        time.sleep(delay)


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
    if exc.status == 404 and verb == "create" and k.api == "CustomObjectsApi":
        return KubeApiError(f"cannot create {what}{where}: the API has no {k.resource} "
                            f"(HTTP 404); is the KubeRay operator installed with its CRDs? "
                            f"(helm install kuberay-operator kuberay/kuberay-operator)", 404)
    if exc.status == 401:
        return KubeApiError(f"unauthorized: the Kubernetes API at {host} rejected our "
                            f"credentials when trying to {verb} {what}{where}", 401)
    return KubeApiError(f"{verb} {what}{where} failed: HTTP {exc.status} {exc.reason}"
                        f"{': ' + message if message else ''}", exc.status)
