"""The reasons `status` and serve give, from the messages Kubernetes really writes."""

from __future__ import annotations

import pytest

from cluster import diagnose

GPU_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}


@pytest.mark.parametrize("message,short,reason", [
    ("0/4 nodes are available: 1 Insufficient cpu, 3 Insufficient memory. preemption: 0/4 "
     "nodes are available: 4 No preemption victims found for incoming pod.",
     ["cpu", "memory"], None),
    ("0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. "
     "preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.",
     [], "no node matches the node selector cloud.google.com/gke-accelerator=nvidia-h100-80gb "
         "(is there a GPU node pool with cloud.google.com/gke-accelerator=nvidia-h100-80gb"),
    ("0/2 nodes are available: 2 node(s) had untolerated taint {nvidia.com/gpu: present}.",
     [], "nodes carry a taint the pod does not tolerate (nvidia.com/gpu: present)"),
    ("pod didn't trigger scale-up: 1 Insufficient nvidia.com/gpu, 1 max node group size "
     "reached", ["nvidia.com/gpu"], "the node pool is at its maximum size"),
])
def test_scheduling_messages(message, short, reason):
    got_short, reasons = diagnose.explain_scheduling(message, GPU_SELECTOR)
    assert got_short == short
    if reason:
        assert any(r.startswith(reason) for r in reasons), reasons
    else:
        assert reasons == []


def _rc(replicas: int) -> dict:
    return {"metadata": {"name": "rc"},
            "spec": {"workerGroupSpecs": [{"groupName": "gpu", "replicas": replicas,
                                           "minReplicas": 0, "maxReplicas": 4}]}}


def test_image_pull_and_starting_pods():
    pods = [
        {"metadata": {"name": "h", "labels": {"ray.io/node-type": "head",
                                              "ray.io/group": "headgroup"}},
         "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
        {"metadata": {"name": "w1", "labels": {"ray.io/group": "gpu"}},
         "status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {
             "reason": "ImagePullBackOff",
             "message": 'Back-off pulling image "rayproject/ray:2.60.0-py311-gpux"'}}}]}},
        {"metadata": {"name": "w2", "labels": {"ray.io/group": "gpu"}},
         "status": {"phase": "Pending"}},
    ]
    groups = {g.group: g for g in diagnose.diagnose(_rc(3), pods, [])}
    assert groups["headgroup"].ok
    gpu = groups["gpu"]
    assert (gpu.desired, gpu.existing, gpu.ready) == (3, 2, 0)
    assert gpu.reasons[0].startswith("w1: ImagePullBackOff (Back-off pulling image")
    assert "pending (scheduled, starting containers)" in gpu.reasons
    assert "1 pod(s) not created yet by the KubeRay operator" in gpu.reasons
    assert gpu.line().startswith("gpu: 0/3 ready (2 pods exist); w1: ImagePullBackOff")


def test_replicas_are_clamped_to_the_group_bounds_and_ready_conditions():
    rc = _rc(9)
    assert diagnose.diagnose(rc, [], [])[1].desired == 4
    rc["status"] = {"conditions": [{"type": "HeadPodReady", "status": "True"},
                                   {"type": "RayClusterProvisioned", "status": "True"}]}
    assert diagnose.raycluster_ready(rc)
    rc["status"]["conditions"][1]["status"] = "False"
    assert not diagnose.raycluster_ready(rc)
    assert diagnose.raycluster_ready({"status": {"state": "ready"}})
