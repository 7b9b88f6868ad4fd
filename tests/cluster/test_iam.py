"""Item 3's table: each call on the bucket, its permission and source; the roles the setup
script grants cover it, and docs/gke.md prints the same table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster import gcloud, iam
from cluster.config import load_config

REPO = Path(__file__).resolve().parents[2]
EXCERPT = REPO / "cluster" / "schemas" / "triton-core-r24.12" / "gcs.h.excerpt"


def test_docs_hold_the_table_of_the_code():
    assert iam.markdown_table() in (REPO / "docs" / "gke.md").read_text()


def test_triton_rows_are_the_calls_in_the_vendored_gcs_h():
    text = EXCERPT.read_text()
    for call in ("GetBucketMetadata", "ListObjects", "GetObjectMetadata", "ReadObject"):
        assert f"client_->{call}(" in text
        assert any(call in c.call for c in iam.CALLS if c.account == iam.TRITON), call
    for c in (c for c in iam.CALLS if c.account == iam.TRITON):
        # Each Triton row quotes the vendored line it rests on.
        quoted = c.source.split('"')[1]
        assert "gcs.h" in c.source and quoted in text, quoted


@pytest.mark.parametrize("name", ["cluster-gke.yaml", "cluster-small.yaml"])
def test_roles_the_script_grants_cover_the_table(name):
    cfg = load_config(REPO / "examples" / name)
    script = gcloud.script(cfg, name)
    granted: dict[str, set[str]] = {}
    for member, role in re.findall(r"buckets add-iam-policy-binding gs://\S+ "
                                   r"--member=serviceAccount:(\S+) --role=(\S+)", script):
        granted.setdefault(member, set()).update(iam.ROLE_PERMISSIONS[role])
    for gsa, who in iam.accounts(cfg.service_accounts.google_service_account,
                                 cfg.service_accounts.triton_gsa).items():
        assert iam.missing(who, granted.get(gsa, set())) == [], gsa
    # objectViewer alone would leave Triton's GetBucketMetadata without storage.buckets.get.
    assert [c.permission for c in iam.missing({iam.TRITON},
                                               set(iam.ROLE_PERMISSIONS["roles/storage.objectViewer"]))
            ] == ["storage.buckets.get"]


def test_setup_grants_nodes_and_build_explicitly():
    cfg = load_config(REPO / "examples" / "cluster-gke.yaml")
    lines = gcloud.script(cfg, "c.yaml").splitlines()
    nodes, build = gcloud.node_gsa(cfg), gcloud.build_gsa(cfg)
    assert any(f"--member=serviceAccount:{nodes} --role=roles/artifactregistry.reader" in x
               for x in lines)
    assert any(f"--member=serviceAccount:{build} --role=roles/artifactregistry.writer" in x
               for x in lines)
    assert all(x.startswith("retry ") for x in lines if "add-iam-policy-binding" in x)
    assert all(f"--service-account={nodes}" in x for x in lines
               if "clusters create" in x or "node-pools create" in x)
    submit = next(x for x in lines if x.startswith("gcloud builds submit"))
    assert f"--service-account=projects/{cfg.project}/serviceAccounts/{build}" in submit
    # Nothing is created before the accelerator check.
    check = next(i for i, x in enumerate(lines) if "accelerator-types describe" in x)
    assert not any(" create " in x for x in lines[:check])
    teardown = gcloud.script(cfg, "c.yaml", teardown=True)
    for needle in ("artifacts repositories delete t5ft", f"storage rm -r {gcloud.build_staging(cfg)}",
                   f"service-accounts delete {nodes}", f"service-accounts delete {build}",
                   "clusters delete t5ft"):
        assert needle in teardown


def test_gcloud_teardown_cli(capsys):
    from cluster.__main__ import main

    config = str(REPO / "examples" / "cluster-gke.yaml")
    assert main(["gcloud", "--teardown", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Google Cloud teardown for {config}")
    assert "gcloud artifacts repositories delete t5ft --location=us-central1 --quiet" in out
    assert "\n# gcloud storage rm -r gs://my-gcp-project-t5ft\n" in out  # data: commented


def test_facts_table_names_tests_that_exist():
    docs = (REPO / "docs" / "gke.md").read_text()
    table = docs.split("## Facts we rely on", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 15
    names = set(re.findall(r"`(test_\w+)`", table))
    sources = "".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    assert names and all(f"def {n}(" in sources for n in names), \
        sorted(n for n in names if f"def {n}(" not in sources)
    assert all(re.search(r"tests?/|test_", row.rsplit("|", 2)[1]) for row in rows), rows


@pytest.mark.parametrize("name,ray,triton", [("cluster-gke.yaml", 2, 1),
                                             ("cluster-small.yaml", 1, 1)])
def test_gpu_pool_and_quota_sized_for_ray_gpu_workers_plus_triton(name, ray, triton):
    cfg = load_config(REPO / "examples" / name)
    size = gcloud.gpu_pool_nodes(cfg)
    g = cfg.gpu_workers
    # One Ray GPU pod per node here (gpus == node_gpus), one whole-node Triton replica.
    assert (size["ray"], size["triton"]) == (ray, triton)
    assert size["gpus"] == (ray + triton) * g.gpus_per_node
    script = gcloud.script(cfg, name)
    pool = next(x for x in script.splitlines() if f"node-pools create {g.group} " in x)
    assert f"--max-nodes={ray + triton} " in pool
    assert f"= {size['gpus']} GPUs: GPUS_ALL_REGIONS" in script.splitlines()[2]
    # Three Triton replicas of one GPU each on 2-GPU nodes: two nodes (replicas share a node).
    two = cfg.model_copy(update={"gpu_workers": g.model_copy(update={"node_gpus": 2}),
                                 "triton": cfg.triton.model_copy(
                                     update={"max_replicas": 3, "gpus": 1})})
    assert gcloud.gpu_pool_nodes(two)["triton"] == 2
