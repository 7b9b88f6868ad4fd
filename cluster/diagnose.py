"""Why a group is short of pods: read from the RayCluster, its pods and their events (pure).

GPU workers that "never appear and say nothing" (ray-project/kuberay #2528, ray #50298) say a
lot in the scheduler's and the cluster autoscaler's events; this module turns those into one
line per group: how many pods are ready of how many wanted, which resource is short, and why.
Inputs are the API's JSON (dicts), as cluster/kubeapi.py returns them.
"""

from __future__ import annotations

import dataclasses
import re

from cluster.config import ACCELERATOR_LABEL

HEAD_GROUP = "headgroup"
_INSUFFICIENT = re.compile(r"Insufficient ([A-Za-z0-9./_-]*[A-Za-z0-9])")
_WAITING_PROBLEMS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff",
                     "CreateContainerConfigError", "CreateContainerError", "RunContainerError")


@dataclasses.dataclass
class GroupHealth:
    """One group's state. short: resources the scheduler found insufficient; reasons: why
    pods are missing or pending, most useful first."""

    group: str
    desired: int
    existing: int = 0
    ready: int = 0
    short: list[str] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every wanted pod of the group is ready."""
        return self.ready >= self.desired

    def line(self) -> str:
        """One human line: `gpu: 0/1 ready (1 pods exist); short of nvidia.com/gpu; ...`."""
        text = f"{self.group}: {self.ready}/{self.desired} ready"
        if self.existing != self.ready:
            text += f" ({self.existing} pods exist)"
        if self.short:
            text += f"; short of {', '.join(self.short)}"
        if self.reasons:
            text += f"; {'; '.join(self.reasons)}"
        return text

    def to_json(self) -> dict:
        """The group for `status --json` (the same facts as line())."""
        return {"group": self.group, "desired": self.desired, "existing": self.existing,
                "ready": self.ready, "ok": self.ok, "short": self.short,
                "reasons": self.reasons}


def _condition(obj: dict, type_: str) -> dict | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def raycluster_ready(rc: dict) -> bool:
    """KubeRay's readiness: state "ready", or the HeadPodReady and RayClusterProvisioned
    conditions (state is deprecated in favour of conditions)."""
    status = rc.get("status") or {}
    if status.get("state") == "ready":
        return True
    head = _condition(rc, "HeadPodReady")
    provisioned = _condition(rc, "RayClusterProvisioned")
    return bool(head and head.get("status") == "True" and provisioned
                and provisioned.get("status") == "True")


def pod_ready(pod: dict) -> bool:
    """Running with the Ready condition True (Running alone includes failing probes)."""
    cond = _condition(pod, "Ready")
    return (pod.get("status") or {}).get("phase") == "Running" and bool(
        cond and cond.get("status") == "True")


def _add(items: list[str], value: str) -> None:
    if value and value not in items:
        items.append(value)


def explain_scheduling(message: str, node_selector: dict[str, str] | None) -> tuple[list[str],
                                                                                     list[str]]:
    """(short resources, reasons) from a FailedScheduling / NotTriggerScaleUp message."""
    short: list[str] = []
    reasons: list[str] = []
    for resource in _INSUFFICIENT.findall(message):
        _add(short, resource)
    if "didn't match Pod's node affinity/selector" in message or \
            "didn't match node selector" in message:
        selector = ", ".join(f"{k}={v}" for k, v in (node_selector or {}).items())
        hint = ""
        if node_selector and ACCELERATOR_LABEL in node_selector:
            hint = (f" (is there a GPU node pool with {ACCELERATOR_LABEL}="
                    f"{node_selector[ACCELERATOR_LABEL]}, and autoscaling on it?)")
        _add(reasons, f"no node matches the node selector {selector or '(none)'}{hint}")
    if "untolerated taint" in message or "had taint" in message:
        taint = re.search(r"taint \{([^}]*)\}", message)
        _add(reasons, f"nodes carry a taint the pod does not tolerate"
                      f"{' (' + taint.group(1) + ')' if taint else ''}")
    if "max node group size reached" in message or "max cluster" in message:
        _add(reasons, "the node pool is at its maximum size")
    if "exceeded quota" in message or "QUOTA_EXCEEDED" in message or "quota" in message.lower():
        _add(reasons, "a quota is exhausted (GPU quota of the region?)")
    return short, reasons


def pod_problems(pod: dict, events: list[dict]) -> tuple[list[str], list[str]]:
    """(short resources, reasons) why POD is not ready: its PodScheduled condition and the
    scheduler's and autoscaler's EVENTS about it, oldest first, then container waiting states."""
    short: list[str] = []
    reasons: list[str] = []
    name = pod.get("metadata", {}).get("name", "?")
    selector = (pod.get("spec") or {}).get("nodeSelector")
    status = pod.get("status") or {}
    scheduled = _condition(pod, "PodScheduled")
    messages = []
    if scheduled and scheduled.get("status") == "False":
        messages.append(scheduled.get("message") or scheduled.get("reason") or "")
    own = [e for e in events if (e.get("involvedObject") or {}).get("name") == name]
    own.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    for event in own:
        if event.get("reason") in ("FailedScheduling", "NotTriggerScaleUp"):
            messages.append(event.get("message") or "")
    for message in messages:
        s, r = explain_scheduling(message, selector)
        for item in s:
            _add(short, item)
        for item in r:
            _add(reasons, item)
    if messages and not short and not reasons:
        _add(reasons, f"{name} unschedulable: {' '.join(messages[-1].split())[:200]}")
    scale_up = [e for e in own if e.get("reason") == "TriggeredScaleUp"]
    if scale_up and status.get("phase") == "Pending":
        _add(reasons, "cluster autoscaler is adding a node (TriggeredScaleUp)")
    for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses")
                                                         or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_PROBLEMS:
            detail = " ".join((waiting.get("message") or "").split())[:160]
            _add(reasons, f"{name}: {waiting['reason']}{' (' + detail + ')' if detail else ''}")
    return short, reasons


def diagnose(rc: dict, pods: list[dict], events: list[dict]) -> list[GroupHealth]:
    """Per group (head first, then workers in spec order): desired vs ready, and why short."""
    spec = rc.get("spec") or {}
    groups: list[GroupHealth] = [GroupHealth(HEAD_GROUP, 1)]
    for wg in spec.get("workerGroupSpecs") or []:
        desired = wg.get("replicas", wg.get("minReplicas", 0)) or 0
        desired = max(wg.get("minReplicas", 0) or 0, min(desired, wg.get("maxReplicas", desired)))
        groups.append(GroupHealth(wg["groupName"], desired))
    by_name = {g.group: g for g in groups}
    rc_name = (rc.get("metadata") or {}).get("name")
    rc_events = [e for e in events if (e.get("involvedObject") or {}).get("kind") == "RayCluster"
                 and (e.get("involvedObject") or {}).get("name") == rc_name]
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        group = (HEAD_GROUP if labels.get("ray.io/node-type") == "head"
                 else labels.get("ray.io/group"))
        health = by_name.get(group)
        if health is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        health.existing += 1
        if pod_ready(pod):
            health.ready += 1
            continue
        short, reasons = pod_problems(pod, events)
        for item in short:
            _add(health.short, item)
        for item in reasons:
            _add(health.reasons, item)
        if not short and not reasons and (pod.get("status") or {}).get("phase") == "Pending":
            _add(health.reasons, "pending (scheduled, starting containers)")
    for health in groups:
        if health.existing < health.desired:
            missing = health.desired - health.existing
            failures = [e for e in rc_events if e.get("type") == "Warning"]
            if failures:
                last = " ".join((failures[-1].get("message") or "").split())[:200]
                s, r = explain_scheduling(last, None)
                for item in s:
                    _add(health.short, item)
                _add(health.reasons, f"{missing} pod(s) not created: "
                                     f"{failures[-1].get('reason', 'Warning')}: {last}")
                for item in r:
                    _add(health.reasons, item)
            else:
                _add(health.reasons, f"{missing} pod(s) not created yet by the KubeRay operator")
    return groups


def summary(rc: dict, groups: list[GroupHealth]) -> str:
    """A one-line headline: the cluster's state and each group's ready count."""
    status = rc.get("status") or {}
    state = status.get("state") or ("ready" if raycluster_ready(rc) else "not ready")
    counts = ", ".join(f"{g.group} {g.ready}/{g.desired}" for g in groups)
    return f"RayCluster {rc.get('metadata', {}).get('name')}: {state} ({counts})"


# The KubeRay operator's event when it refuses a RayCluster's spec and creates no pod
# (ray-project/kuberay v1.7.0 ray-operator/controllers/ray/utils/constant.go InvalidRayClusterSpec,
# raycluster_controller.go: "The RayCluster spec is invalid NS/NAME: ERR"). Warnings of the same
# reason that do not stop it ("RayCluster spec warning ...") are not refusals.
INVALID_SPEC_REASON = "InvalidRayClusterSpec"
_REFUSALS = (INVALID_SPEC_REASON, "InvalidRayClusterMetadata")
_REFUSAL_PREFIX = "The RayCluster "


def _event_key(event: dict) -> tuple[str, int]:
    return (event.get("metadata") or {}).get("name", ""), int(event.get("count") or 1)


def operator_refusal(events: list[dict], kind: str, name: str,
                     seen: set[tuple[str, int]] = frozenset()) -> str | None:
    """"REASON: MESSAGE" of the operator's event refusing KIND/NAME, from EVENTS, or None;
    events whose (name, count) is in SEEN (there before we applied) are old news, skipped."""
    for event in events:
        involved = event.get("involvedObject") or {}
        if (event.get("reason") in _REFUSALS and involved.get("kind") == kind
                and involved.get("name") == name and _event_key(event) not in seen
                and (event.get("message") or "").startswith(_REFUSAL_PREFIX)):
            return f"{event['reason']}: {' '.join(event['message'].split())}"
    return None


def event_keys(events: list[dict]) -> set[tuple[str, int]]:
    """(name, count) of EVENTS: what operator_refusal should treat as already seen."""
    return {_event_key(e) for e in events}
