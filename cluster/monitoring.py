"""PodMonitoring objects for Google Cloud Managed Service for Prometheus (pure).

Managed Prometheus scrapes what a PodMonitoring (monitoring.googleapis.com/v1) selects:
https://cloud.google.com/stackdriver/docs/managed-prometheus/setup-managed#gmp-pod-monitoring.
We render two with the cluster: the Ray pods' metrics port (every Ray node exports on 8080,
the head names it `metrics`) and every Triton pod's `metrics` port (8002) in the namespace.
Schema: cluster/schemas/monitoring.googleapis.com_podmonitorings.yaml (vendored, README there).
"""

from __future__ import annotations

from cluster import pods, raycluster, triton
from cluster.config import ClusterConfig

API_VERSION = "monitoring.googleapis.com/v1"
SCRAPE_INTERVAL = "30s"


def _pod_monitoring(cfg: ClusterConfig, name: str, selector: dict[str, str],
                    port: int | str) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitoring",
        "metadata": {"name": name, "namespace": cfg.namespace,
                     "labels": pods.labels("ray", cfg.name)},
        "spec": {"selector": {"matchLabels": selector},
                 "endpoints": [{"port": port, "interval": SCRAPE_INTERVAL}]},
    }


def ray_monitoring(cfg: ClusterConfig) -> dict:
    """Ray's metrics on every pod of this cluster (or RayJob): head and workers alike."""
    selector = {"app.kubernetes.io/instance": cfg.name,
                "app.kubernetes.io/managed-by": pods.MANAGED_BY}
    return _pod_monitoring(cfg, f"{cfg.name}-ray", selector, raycluster.METRICS_PORT)


def triton_monitoring(cfg: ClusterConfig) -> dict:
    """Triton's Prometheus metrics (the container port named `metrics`: cluster/triton.py's
    METRICS_PORT, 8002) on every Triton pod serve launches."""
    return _pod_monitoring(cfg, f"{cfg.name}-triton", triton.SELECTOR, "metrics")


def monitoring_objects(cfg: ClusterConfig) -> list[dict]:
    """Both PodMonitorings, rendered and applied with the cluster (none when the config's
    managed_prometheus is false: the cluster then has no PodMonitoring CRD)."""
    if not cfg.managed_prometheus:
        return []
    return [ray_monitoring(cfg), triton_monitoring(cfg)]

