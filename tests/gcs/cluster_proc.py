"""A multi-node ``ray.cluster_utils.Cluster`` in a process of its own, driven over stdin.

    python -m tests.gcs.cluster_proc WORKERS
    -> prints {"address": GCS_ADDRESS} once every node is up, then reads commands:
       "kill I"   SIGKILL worker node I (its raylet and workers), answers "killed I"
       "shutdown" (or end of input) removes every node and exits

Why a process: ``Cluster.shutdown`` resets process-global Ray state (the internal KV client),
which would break the session's own Ray in the pytest process. The head has no CPUs, so every
task runs on a worker node that can be killed; it notices a dead node in ~1.5 s instead of
Ray's default ~15 s. Nodes inherit this process's environment (the GCS emulator variables).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from ray.cluster_utils import Cluster

    workers_wanted = int(argv[0]) if argv else 2
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
    })
    workers = [cluster.add_node(num_cpus=1) for _ in range(workers_wanted)]
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "kill":
                cluster.remove_node(workers[int(cmd[1])], allow_graceful=False)
                print(f"killed {cmd[1]}", flush=True)
            elif cmd[0] == "shutdown":
                break
            else:
                print(f"unknown command {cmd[0]!r}", flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
