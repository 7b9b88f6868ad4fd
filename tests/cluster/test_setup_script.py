"""The setup script of `python -m cluster gcloud`, run by bash as a user runs it.

gcloud, kubectl, helm and the cluster's own commands cannot run here, so each is a small
program on PATH that answers as the real one does for what the script relies on: `describe`
/ `get` exit non-zero for something that does not exist, and `create` of something that
exists fails (gcloud: "ALREADY_EXISTS", kubectl: "AlreadyExists"), which under `set -e` stops
the script. Every other command succeeds and is recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster import gcloud
from cluster.config import load_config

REPO = Path(__file__).resolve().parents[2]

FAKE = '''\
import json, os, sys
tool, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
state = os.environ["FAKE_STATE"]
with open(state + ".log", "a") as log:
    log.write(json.dumps([tool, *argv]) + "\\n")
verbs = [i for i, a in enumerate(argv) if a in ("describe", "get", "create")]
if not verbs or tool not in ("gcloud", "kubectl"):
    sys.exit(0)
i = verbs[0]
# The thing named: gcloud GROUP... VERB NAME (an account by email or by id), kubectl VERB KIND NAME.
key = (argv[i + 1] + " " + argv[i + 2]) if tool == "kubectl" else \\
    " ".join(argv[:i] + [argv[i + 1].split("@")[0]])
have = set(open(state).read().split("\\n")) if os.path.exists(state) else set()
if argv[i] == "create":
    if key in have:
        sys.exit(f"ERROR: ({tool}) {key}: ALREADY_EXISTS")
    with open(state, "a") as f:
        f.write(key + "\\n")
    sys.exit(0)
sys.exit(0 if key in have else 1)
'''


def _run_setup(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("gcloud", "kubectl", "helm", "python"):
        exe = bin_dir / tool
        exe.write_text(f"#!{sys.executable}\n{FAKE}")
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "FAKE_STATE": str(tmp_path / "state")}
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_setup_script_runs_again_after_it_stopped_part_way(tmp_path):
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    script = gcloud.script(cfg, "c.yaml")
    # The zone offers the accelerator (the script's check describes it).
    (tmp_path / "state").write_text("compute accelerator-types nvidia-a100-80gb\n")
    first = _run_setup(tmp_path, script)
    assert first.returncode == 0, first.stderr
    # Everything the script makes was created once: 4 accounts, the cluster, 2 pools,
    # 2 buckets, the registry repository, the namespace.
    creates = [line for line in (tmp_path / "state.log").read_text().splitlines()
               if '"create"' in line]
    assert len(creates) == 11, creates
    # Run again (a user after fixing a quota): nothing is created twice, and it gets to `up`.
    (tmp_path / "state.log").unlink()
    second = _run_setup(tmp_path, script)
    assert second.returncode == 0, second.stderr
    again = (tmp_path / "state.log").read_text().splitlines()
    assert not [line for line in again if '"create"' in line]
    assert again[-1] == '["python", "-m", "cluster", "up", "--config=c.yaml"]'
    # The operator is installed or upgraded in place, and the script waits until it is
    # available: doctor, two commands later, fails on an operator without a ready replica.
    helm = next(line for line in again if line.startswith('["helm", "upgrade"'))
    assert '"--install"' in helm and '"--wait"' in helm


def test_teardown_points_kubectl_at_the_cluster_before_down(tmp_path):
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    done = _run_setup(tmp_path, gcloud.script(cfg, "c.yaml", teardown=True))
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "state.log").read_text().splitlines()
    creds = log.index('["gcloud", "container", "clusters", "get-credentials", "t5ft", '
                      '"--zone=us-central1-a"]')
    assert creds < log.index('["python", "-m", "cluster", "down", "--config=c.yaml"]')
