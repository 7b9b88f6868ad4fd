"""Our objects against what KubeRay v1.7.0 enforces, read from its vendored sources
(cluster/schemas/kuberay-v1.7.0: features.go, validation.go, the chart's values.yaml and
_helpers.tpl), and `up` / `up --job` ending on the operator's refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cluster import gcloud, kuberay, raycluster
from cluster.__main__ import main
from cluster.config import load_config
from core.errors import UserError

REPO = Path(__file__).resolve().parents[2]
GKE = REPO / "examples" / "cluster-gke.yaml"
SMALL = REPO / "examples" / "cluster-small.yaml"
VENDORED = REPO / "cluster" / "schemas" / "kuberay-v1.7.0"
RC = "/apis/ray.io/v1/namespaces/t5ft/rayclusters"
EVENTS = "/api/v1/namespaces/t5ft/events"
# Gates validation.go consults without a "spec.X requires the G feature gate" message, and the
# fields behind them (read in validation.go at v1.7.0), which our objects must not set.
UNPATTERNED = {"RayJobDeletionPolicy": ["suspend", "deletionStrategy"],
               "RayClusterHistoryServer": ["historyServerOptions"],
               "GCSFaultToleranceEmbeddedStorage": ["gcsFaultToleranceOptions"]}


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | set().union(*(_keys(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_keys(v) for v in node)) if node else set()
    return set()


def test_field_to_gate_map_is_read_from_validation_go():
    text = (VENDORED / "validation.go").read_text()
    fields = kuberay.gated_fields()
    # The map is the vendored text's, not a hand-typed copy.
    assert fields == dict(re.findall(r'"(spec\.\w+) requires the (\w+) feature gate', text))
    assert fields["spec.networkPolicy"] == "RayClusterNetworkPolicy"
    # Every gate validation.go consults is either in the map or known and unused by us.
    assert kuberay.checked_gates() <= set(fields.values()) | set(UNPATTERNED)
    # features.go: the network policy gate is alpha and off by default; the chart agrees.
    assert kuberay.default_gates()["RayClusterNetworkPolicy"] == (False, "Alpha")
    chart = {g["name"]: g["enabled"] for g in kuberay.chart_values()["featureGates"]}
    assert chart["RayClusterNetworkPolicy"] is False


@pytest.mark.parametrize("path", [GKE, SMALL], ids=lambda p: p.name)
def test_every_gated_field_we_emit_is_enabled_by_the_setup_scripts_helm_values(path):
    cfg = load_config(path)
    script = gcloud.script(cfg, str(path))
    # The values file the script writes (a heredoc) and installs with helm --values.
    match = re.search(rf"cat > {gcloud.KUBERAY_VALUES} <<'EOF'\n(.*?)\nEOF\n", script, re.S)
    assert match and f"--values={gcloud.KUBERAY_VALUES}" in script
    values = yaml.safe_load(match.group(1))
    # Helm replaces lists: the file carries the chart's whole list, in the chart's order.
    chart = [g["name"] for g in kuberay.chart_values()["featureGates"]]
    assert [g["name"] for g in values["featureGates"]][:len(chart)] == chart
    # The flag the chart renders from it (_helpers.tpl), over features.go's defaults.
    helpers = (VENDORED / "_helpers.tpl").read_text()
    assert '--feature-gates={{ $features | trimSuffix "," }}' in helpers
    gates = kuberay.effective_gates([kuberay.feature_gates_arg(values)])
    objects = [raycluster.raycluster(cfg), raycluster.rayjob(cfg, "python x.py")]
    needed = kuberay.required_gates(objects)
    assert needed == {"RayClusterNetworkPolicy": "RayCluster spec.networkPolicy"}
    assert all(gates[g] for g in needed)
    # And the gates behind messages of another shape guard fields we never set.
    used = set().union(*(_keys(kuberay.cluster_spec(o)) | _keys(o["spec"]) for o in objects))
    for gate, gated in UNPATTERNED.items():
        assert not used & set(gated), gate


def test_without_the_values_our_spec_needs_a_gate_the_chart_leaves_off():
    # The negative: the chart's own values would make the operator refuse our objects.
    cfg = load_config(GKE)
    gates = kuberay.effective_gates([kuberay.feature_gates_arg(kuberay.chart_values())])
    needed = kuberay.required_gates([raycluster.raycluster(cfg)])
    assert [g for g in needed if not gates[g]] == ["RayClusterNetworkPolicy"]


def _refusal_event(name: str, count: int = 1) -> dict:
    # As raycluster_controller.go records it (Eventf with InvalidRayClusterSpec, ValidateAction).
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"t5ft.{name}", "namespace": "t5ft"},
            "involvedObject": {"kind": "RayCluster", "name": "t5ft", "namespace": "t5ft"},
            "reason": "InvalidRayClusterSpec", "type": "Warning", "action": "Validate",
            "count": count,
            "message": "The RayCluster spec is invalid t5ft/t5ft: spec.networkPolicy requires "
                       "the RayClusterNetworkPolicy feature gate to be enabled"}


def test_up_stops_at_once_on_the_operators_invalid_spec_event(api, kubeconfig):
    # An old refusal (there before up applied) does not stop it; a new one does, at once.
    api.put("/api/v1/namespaces/t5ft", {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": "t5ft"}})
    api.put(f"{EVENTS}/t5ft.old", _refusal_event("old"))
    api.statuses[f"{RC}/t5ft"] = [{"state": ""}]
    original = api.answer

    def answer(method, path, query, body):
        # The operator's reaction to the RayCluster: a refusal event on the second poll.
        if method == "GET" and path == f"{RC}/t5ft" and len(api.calls("GET", f"{RC}/t5ft")) == 2:
            api.objects[f"{EVENTS}/t5ft.new"] = _refusal_event("new")
        return original(method, path, query, body)

    api.answer = answer
    try:
        with pytest.raises(UserError, match=r"^RayCluster t5ft: the KubeRay operator refused it, "
                                            r"InvalidRayClusterSpec: The RayCluster spec is "
                                            r"invalid t5ft/t5ft: spec.networkPolicy requires the "
                                            r"RayClusterNetworkPolicy feature gate"):
            main(["up", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--poll", "0.01",
                  "--timeout", "60"])
    finally:
        del api.answer
    assert len(api.calls("GET", f"{RC}/t5ft")) == 2  # no waiting past the refusal


def test_up_job_ends_on_validation_failed_with_the_operators_message(api, kubeconfig):
    # rayjob_controller.go: ValidationFailed, reason ValidationFailed, message err.Error();
    # the controller never leaves it, so waiting on would wait forever.
    api.statuses["/apis/ray.io/v1/namespaces/t5ft/rayjobs/t5ft-job"] = [
        {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
         "message": "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to "
                    "be enabled"}]
    with pytest.raises(UserError, match=r"^RayJob t5ft-job ended without a job "
                                        r"\(ValidationFailed, ValidationFailed\): spec.network"
                                        r"Policy requires the RayClusterNetworkPolicy"):
        main(["up", "--config", str(GKE), "--kubeconfig", str(kubeconfig), "--poll", "0.01",
              "--job", "python x.py"])


def test_status_names_the_operators_refusal(api, kubeconfig, capsys):
    cfg = load_config(GKE)
    api.put(f"{RC}/t5ft", raycluster.raycluster(cfg) | {"status": {}})
    api.put(f"{EVENTS}/t5ft.x", _refusal_event("x"))
    assert main(["status", "--config", str(GKE), "--kubeconfig", str(kubeconfig)]) == 0
    headline = capsys.readouterr().out.splitlines()[0]
    assert headline.endswith("; the KubeRay operator refused the spec: InvalidRayClusterSpec: "
                             "The RayCluster spec is invalid t5ft/t5ft: spec.networkPolicy "
                             "requires the RayClusterNetworkPolicy feature gate to be enabled")
