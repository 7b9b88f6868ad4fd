"""What the KubeRay operator enforces, read from its v1.7.0 sources vendored in cluster/schemas/.

Nothing here is typed by hand from memory: the feature gates and their defaults come from
`features.go` (defaultFeatureGates), the fields that need a gate from `validation.go` (its
"spec.X requires the G feature gate" errors), and the gates the Helm chart passes from the
chart's `values.yaml` (featureGates). cluster/schemas/README.md names the tag and paths.

The setup script installs the chart with a values file from `helm_values` (the chart's whole
`featureGates` list, since Helm replaces lists instead of merging them, with the gates our
objects need turned on); `python -m cluster doctor` reads the gates the operator's Deployment
really runs with (`--feature-gates=...`, the chart's _helpers.tpl) and compares.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml

SOURCES = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
# The operator's Deployment as the chart names it for `helm install kuberay-operator ...`
# (release name = chart name: templates/_helpers.tpl, "kuberay-operator.fullname") and the
# container's flag (templates/deployment.yaml appends "kuberay.featureGates").
OPERATOR_DEPLOYMENT = "kuberay-operator"
FEATURE_GATES_FLAG = "--feature-gates="
_REQUIRES = re.compile(r'"(spec\.[A-Za-z0-9_.]+) requires the (\w+) feature gate')
_DEFAULT = re.compile(r"^\s*(\w+):\s*\{Default:\s*(true|false),\s*PreRelease:\s*featuregate\.(\w+)\}",
                      re.M)
_ENABLED = re.compile(r"features\.Enabled\(features\.(\w+)\)")


def _read(name: str) -> str:
    return (SOURCES / name).read_text()


@functools.cache
def gated_fields() -> dict[str, str]:
    """Field path ("spec.networkPolicy") -> the feature gate validation.go requires for it."""
    return dict(_REQUIRES.findall(_read("validation.go")))


@functools.cache
def checked_gates() -> set[str]:
    """Every gate validation.go consults (features.Enabled(features.G)), patterned or not."""
    return set(_ENABLED.findall(_read("validation.go")))


@functools.cache
def default_gates() -> dict[str, tuple[bool, str]]:
    """Gate -> (default, pre-release stage) from features.go's defaultFeatureGates."""
    return {name: (default == "true", stage)
            for name, default, stage in _DEFAULT.findall(_read("features.go"))}


@functools.cache
def chart_values() -> dict:
    """The chart's values.yaml (helm-chart/kuberay-operator/values.yaml at v1.7.0)."""
    return yaml.safe_load(_read("values.yaml"))


def chart_image() -> str:
    """The operator image the chart deploys (image.repository:image.tag)."""
    image = chart_values()["image"]
    return f"{image['repository']}:{image['tag']}"


def emitted_gated_fields(spec: dict) -> list[str]:
    """The gated fields (gated_fields) a RayCluster spec sets."""
    return [path for path in gated_fields()
            if spec.get(path.split(".", 1)[1]) is not None]


def cluster_spec(obj: dict) -> dict | None:
    """The RayCluster spec of a RayCluster or a RayJob (its rayClusterSpec); None otherwise."""
    if obj.get("kind") == "RayCluster":
        return obj.get("spec") or {}
    if obj.get("kind") == "RayJob":
        return (obj.get("spec") or {}).get("rayClusterSpec") or {}
    return None


def required_gates(objects: list[dict]) -> dict[str, str]:
    """Gate -> the field that needs it, for every gated field OBJECTS emit."""
    out: dict[str, str] = {}
    for obj in objects:
        spec = cluster_spec(obj)
        for path in emitted_gated_fields(spec or {}):
            out.setdefault(gated_fields()[path], f"{obj['kind']} {path}")
    return out


def helm_values(gates: set[str] | list[str]) -> dict:
    """The values file for `helm install`: the chart's whole featureGates list (Helm replaces
    a list given in a values file instead of merging it), with GATES enabled."""
    listed = [dict(item) for item in chart_values()["featureGates"]]
    names = {item["name"] for item in listed}
    for item in listed:
        if item["name"] in gates:
            item["enabled"] = True
    listed += [{"name": g, "enabled": True} for g in sorted(gates) if g not in names]
    return {"featureGates": listed}


def parse_feature_gates(args: list[str]) -> dict[str, bool]:
    """The gates a container's ARGS set with --feature-gates=A=true,B=false (last flag wins)."""
    out: dict[str, bool] = {}
    for arg in args:
        if arg.startswith(FEATURE_GATES_FLAG):
            for item in arg[len(FEATURE_GATES_FLAG):].split(","):
                name, _, value = item.partition("=")
                if name.strip():
                    out[name.strip()] = value.strip().lower() == "true"
    return out


def effective_gates(args: list[str]) -> dict[str, bool]:
    """features.go's defaults, overridden by the operator's --feature-gates flag."""
    gates = {name: default for name, (default, _) in default_gates().items()}
    gates.update(parse_feature_gates(args))
    return gates


def feature_gates_arg(values: dict) -> str:
    """The operator's flag as the chart renders VALUES' featureGates (templates/_helpers.tpl,
    "kuberay.featureGates": `--feature-gates=NAME=BOOL,...` in list order)."""
    return FEATURE_GATES_FLAG + ",".join(
        f"{item['name']}={str(bool(item['enabled'])).lower()}" for item in values["featureGates"])
