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
import json, os, re, sys
tool, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
state = os.environ["FAKE_STATE"]
with open(state + ".log", "a") as log:
    log.write(json.dumps([tool, *argv]) + "\\n")
have = [k for k in open(state).read().split("\\n") if k] if os.path.exists(state) else []
# Project IAM bindings: add is idempotent, remove of a binding not there fails (as gcloud's
# "Policy binding with the specified principal, role, and condition not found!"), and
# get-iam-policy --flatten --filter --format=value(bindings.role) prints the role if granted.
if tool == "gcloud" and argv[:1] == ["projects"] and "iam-policy" in argv[1]:
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if argv[1] == "get-iam-policy":
        role, member = re.findall(r'"([^"]*)"', flags["filter"])
        if f"binding {member} {role}" in have:
            print(role)
        sys.exit(0)
    key = f"binding {flags['member']} {flags['role']}"
    if argv[1] == "remove-iam-policy-binding" and key not in have:
        sys.exit("ERROR: Policy binding with the specified principal, role, and condition "
                 "not found!")
    have = [k for k in have if k != key] + ([key] if argv[1].startswith("add") else [])
    with open(state, "w") as f:
        f.write("".join(k + "\\n" for k in have))
    sys.exit(0)
verbs = [i for i, a in enumerate(argv) if a in ("describe", "get", "create", "delete", "rm")]
if not verbs or tool not in ("gcloud", "kubectl"):
    sys.exit(0)
i = verbs[0]
# The thing named: gcloud GROUP... VERB NAME (an account by email or by id), kubectl VERB KIND
# NAME; `gcloud storage rm -r gs://B` removes bucket B.
key = (argv[i + 1] + " " + argv[i + 2]) if tool == "kubectl" else \\
    "storage buckets " + argv[-1] if argv[i] == "rm" else \\
    " ".join(argv[:i] + [argv[i + 1].split("@")[0]])
if argv[i] in ("create", "delete", "rm"):
    if (key in have) == (argv[i] == "create"):
        sys.exit(f"ERROR: ({tool}) {key}: " + ("ALREADY_EXISTS" if key in have else "NOT_FOUND"))
    have = have + [key] if argv[i] == "create" else [k for k in have if k != key]
    with open(state, "w") as f:
        f.write("".join(k + "\\n" for k in have))
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


def test_teardown_points_kubectl_at_the_cluster_first_and_runs_again(tmp_path):
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    (tmp_path / "state").write_text("compute accelerator-types nvidia-a100-80gb\n")
    assert _run_setup(tmp_path, gcloud.script(cfg, "c.yaml")).returncode == 0
    (tmp_path / "state.log").unlink()
    teardown = gcloud.script(cfg, "c.yaml", teardown=True)
    done = _run_setup(tmp_path, teardown)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "state.log").read_text().splitlines()
    # `down` acts on kubectl's current context: pointed at this cluster first.
    creds = log.index('["gcloud", "container", "clusters", "get-credentials", "t5ft", '
                      '"--zone=us-central1-a"]')
    assert creds < log.index('["python", "-m", "cluster", "down", "--config=c.yaml"]')
    # Left: the data bucket (kept on purpose) and what goes with the cluster in GKE (its
    # pools, the namespace), which these stand-ins do not delete with it.
    left = (tmp_path / "state").read_text().split("\n")
    assert sorted(k for k in left if k) == sorted([
        "compute accelerator-types nvidia-a100-80gb", "namespace t5ft",
        "container node-pools convert", "container node-pools gpu",
        "storage buckets gs://my-gcp-project-t5ft"])
    # Run again (it stopped part way, or twice): what is gone is skipped, nothing fails.
    (tmp_path / "state.log").unlink()
    again = _run_setup(tmp_path, teardown)
    assert again.returncode == 0, again.stderr
    assert not [x for x in (tmp_path / "state.log").read_text().splitlines()
                if '"delete"' in x or '"rm"' in x or "get-credentials" in x]


def test_teardown_stopped_between_two_role_removals_runs_again(tmp_path):
    """A teardown that stopped after removing one of an account's project roles (the account
    and its other roles still there) goes on past it on the rerun: remove-iam-policy-binding
    fails on a binding already gone, so each removal runs only while its binding exists."""
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    (tmp_path / "state").write_text("compute accelerator-types nvidia-a100-80gb\n")
    assert _run_setup(tmp_path, gcloud.script(cfg, "c.yaml")).returncode == 0
    state = (tmp_path / "state").read_text().splitlines()
    bindings = [k for k in state if k.startswith("binding ")]
    assert len(bindings) == len(gcloud.NODE_PROJECT_ROLES) + len(gcloud.BUILD_PROJECT_ROLES)
    # The first removal happened, then the teardown stopped.
    (tmp_path / "state").write_text("".join(k + "\n" for k in state if k != bindings[0]))
    done = _run_setup(tmp_path, gcloud.script(cfg, "c.yaml", teardown=True))
    assert done.returncode == 0, done.stderr
    left = (tmp_path / "state").read_text()
    assert "binding " not in left
    assert "iam service-accounts" not in left  # every account deleted after its roles
    removes = [x for x in (tmp_path / "state.log").read_text().splitlines()
               if "remove-iam-policy-binding" in x]
    assert len(removes) == len(bindings) - 1  # the one already gone is not tried again
