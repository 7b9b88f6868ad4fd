"""Replicas spread over a Ray cluster's nodes: a real two-node cluster (two raylets, started by
ray.cluster_utils.Cluster in a child process so it does not clash with the session's Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.serving.conftest import MODEL, _env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import ray
    import tritonclient.grpc as grpcclient
    from ray.cluster_utils import Cluster
    from serving.local import LocalServers
    from tests.serving.conftest import ft_inputs, sample_rows

    repo, model = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        # 0.5 CPU each: both would fit on one node, so only SPREAD separates them.
        with LocalServers(repo, model, replicas=2, num_cpus=0.5, ready_timeout=180) as s:
            outs = []
            for ep in s.endpoints:
                c = grpcclient.InferenceServerClient(ep["grpc"])
                outs.append(c.infer(model, ft_inputs(sample_rows(1), 4))
                            .as_numpy("output_ids").tolist())
                c.close()
            print(json.dumps({"nodes": s.node_ids(), "endpoints": s.endpoints,
                              "outputs": outs,
                              "cluster_nodes": [n["NodeID"] for n in ray.nodes()
                                                if n["Alive"]]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_replicas_spread_over_nodes(serving_model_repo, repo_root):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(serving_model_repo), MODEL],
                          cwd=repo_root, env=_env(repo_root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(result["cluster_nodes"])) == 2
    assert len(set(result["nodes"])) == 2, f"both replicas on one node: {result['nodes']}"
    assert set(result["nodes"]) == set(result["cluster_nodes"])
    assert len({ep["grpc"] for ep in result["endpoints"]}) == 2
    assert result["outputs"][0] == result["outputs"][1]
