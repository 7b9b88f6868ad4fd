"""Who calls what on Google Cloud, the permission each call needs, and the roles that grant them.

One table (`CALLS`) per Google service account: each call our code or Triton makes, the IAM
permission it needs and where that is written. The roles the setup script grants
(`bucket_roles`) are derived from it: the fewest roles of `ROLE_PERMISSIONS` that cover an
account's permissions. `python -m cluster doctor` checks the same table against the bucket's
live IAM policy. docs/gke.md prints the table (tests/cluster/test_iam.py keeps the two equal).

ROLE_PERMISSIONS are the predefined roles' permissions as Google documents them
(https://cloud.google.com/iam/docs/roles-permissions/storage, "Cloud Storage roles"), limited
to the storage.* permissions that matter on a bucket; the doctor reads the live ones
(iam.roles.get) instead.
"""

from __future__ import annotations

import dataclasses
import itertools

# Which account does what: the runner (service_accounts.google_service_account: conversion,
# serve's driver, evaluation) and Triton (service_accounts.triton_google_service_account).
RUNNER, TRITON = "runner", "triton"


@dataclasses.dataclass(frozen=True)
class Call:
    """One API call on the bucket: who makes it, the permission it needs, its source."""

    account: str
    call: str
    permission: str
    source: str


_GCS_JSON = "https://cloud.google.com/storage/docs/json_api/v1"
_TRITON_GCS = ("triton-inference-server/core r24.12 src/filesystem/implementations/gcs.h "
               "(cluster/schemas/triton-core-r24.12/gcs.h.excerpt)")
_STORAGE = "core/storage.py (google-cloud-storage)"
_TENSORSTORE = "conversion/orbax_layout.py (tensorstore's gcs driver, read only)"

CALLS: tuple[Call, ...] = (
    Call(RUNNER, "objects.get (download: checkpoint, configs, dataset, shards to verify)",
         "storage.objects.get", f"{_STORAGE} Blob.download_*; {_TENSORSTORE}; "
         f"{_GCS_JSON}/objects/get"),
    Call(RUNNER, "objects.list (list_files, list_dirs, is_dir)", "storage.objects.list",
         f"{_STORAGE} Client.list_blobs; {_GCS_JSON}/objects/list"),
    Call(RUNNER, "objects.insert (shards, manifest, metrics, predictions)",
         "storage.objects.create", f"{_STORAGE} Blob.upload_*; {_GCS_JSON}/objects/insert"),
    Call(RUNNER, "objects.delete (replace an output, delete_tree on --overwrite)",
         "storage.objects.delete", f"{_STORAGE} Blob.delete; {_GCS_JSON}/objects/delete"),
    Call(TRITON, "GetBucketMetadata (IsDirectory: does the bucket exist)",
         "storage.buckets.get", f"{_TRITON_GCS} GCSFileSystem::IsDirectory: "
         f"\"client_->GetBucketMetadata(bucket)\"; {_GCS_JSON}/buckets/get"),
    Call(TRITON, "ListObjects (IsDirectory, GetDirectoryContents)", "storage.objects.list",
         f"{_TRITON_GCS} GCSFileSystem::GetDirectoryContents: \"client_->ListObjects(bucket, "
         f"gcs::Prefix(full_dir))\"; {_GCS_JSON}/objects/list"),
    Call(TRITON, "GetObjectMetadata, ReadObject (FileExists, ReadTextFile, LocalizePath)",
         "storage.objects.get", f"{_TRITON_GCS} GCSFileSystem::ReadTextFile: "
         f"\"client_->ReadObject(bucket, object)\"; {_GCS_JSON}/objects/get"),
)

# storage.* permissions of the predefined roles we may grant (source in the module docstring).
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/storage.objectViewer": frozenset({
        "storage.objects.get", "storage.objects.list", "storage.folders.get",
        "storage.folders.list", "storage.managedFolders.get", "storage.managedFolders.list"}),
    "roles/storage.legacyBucketReader": frozenset({
        "storage.buckets.get", "storage.objects.list"}),
    "roles/storage.objectAdmin": frozenset({
        "storage.objects.create", "storage.objects.delete", "storage.objects.get",
        "storage.objects.getIamPolicy", "storage.objects.list", "storage.objects.restore",
        "storage.objects.setIamPolicy", "storage.objects.setRetention",
        "storage.objects.update", "storage.folders.create", "storage.folders.delete",
        "storage.folders.get", "storage.folders.list", "storage.folders.rename",
        "storage.managedFolders.create", "storage.managedFolders.delete",
        "storage.managedFolders.get", "storage.managedFolders.list",
        "storage.multipartUploads.abort", "storage.multipartUploads.create",
        "storage.multipartUploads.list", "storage.multipartUploads.listParts"}),
    "roles/storage.legacyBucketWriter": frozenset({
        "storage.buckets.get", "storage.objects.create", "storage.objects.delete",
        "storage.objects.list", "storage.objects.restore", "storage.multipartUploads.abort",
        "storage.multipartUploads.create", "storage.multipartUploads.list",
        "storage.multipartUploads.listParts"}),
}
# Preferred order when several role sets cover the same permissions: the read-only ones first.
_ROLE_ORDER = list(ROLE_PERMISSIONS)


def needed(accounts: set[str]) -> set[str]:
    """The permissions the table's calls of ACCOUNTS need."""
    return {c.permission for c in CALLS if c.account in accounts}


def covering_roles(permissions: set[str]) -> list[str]:
    """The fewest roles of ROLE_PERMISSIONS that together grant PERMISSIONS, fewest
    permissions beyond them on ties (least privilege)."""
    best: tuple[int, int, list[str]] | None = None
    for n in range(1, len(_ROLE_ORDER) + 1):
        for combo in itertools.combinations(_ROLE_ORDER, n):
            granted = set().union(*(ROLE_PERMISSIONS[r] for r in combo))
            if permissions <= granted:
                key = (n, len(granted - permissions), list(combo))
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is not None:
            return best[2]
    raise ValueError(f"no role set covers {sorted(permissions)}")


def accounts(runner_gsa: str, triton_gsa: str) -> dict[str, set[str]]:
    """Google account -> the table's accounts it acts for (both, when Triton has no account
    of its own)."""
    out: dict[str, set[str]] = {}
    out.setdefault(runner_gsa, set()).add(RUNNER)
    out.setdefault(triton_gsa, set()).add(TRITON)
    return out


def bucket_roles(runner_gsa: str, triton_gsa: str) -> dict[str, list[str]]:
    """Google account -> the roles on the bucket it needs (the union, for one account that is
    both the runner and Triton)."""
    return {gsa: covering_roles(needed(who))
            for gsa, who in accounts(runner_gsa, triton_gsa).items()}


def missing(accounts: set[str], granted: set[str]) -> list[Call]:
    """The calls of ACCOUNTS whose permission is not in GRANTED."""
    return [c for c in CALLS if c.account in accounts and c.permission not in granted]


def markdown_table() -> str:
    """CALLS as the Markdown table docs/gke.md holds."""
    lines = ["| account | call | permission | source |", "| --- | --- | --- | --- |"]
    lines += [f"| {c.account} | {c.call} | `{c.permission}` | {c.source} |" for c in CALLS]
    return "\n".join(lines)
