"""Check an overlay before `kubectl apply -k`: what a schema check cannot see.

    python deploy/check.py deploy/overlays/cpu                    # offline: names only
    python deploy/check.py deploy/overlays/cpu --cluster          # the cluster's classes
    python deploy/check.py deploy/overlays/cpu --storage-classes classes.yaml

Refuses, with the claim and the reason:
- a claim without a storage class (it would take the cluster's default, which on most
  clouds cannot give ReadWriteMany, so the claim and every pod that mounts it stay Pending);
- a network filesystem (NFS, EFS, Filestore, Azure Files, CephFS, ...) under a
  ReadWriteOnce claim: Redis's append-only file (fsynced on every write) and the SQLite
  event log (its WAL needs POSIX locks and shared memory between processes of one node)
  must be on local block storage;
- a block-only class (EBS, GCE PD, Azure Disk) under a ReadWriteMany claim;
- with --cluster or --storage-classes, a class the cluster does not have;
- an image still on the placeholder registry (registry.example.com).

A class is a network filesystem when its provisioner is one (the table below), its
parameters say nfs, or, offline, its name says so. Exit status 0: nothing refused.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

PLACEHOLDER_REGISTRY = "registry.example.com"

# Provisioners of network filesystems (CSI driver names and the in-tree / common external ones).
NETWORK_FS_PROVISIONERS = {
    "nfs.csi.k8s.io",
    "kubernetes.io/nfs",
    "k8s-sigs.io/nfs-subdir-external-provisioner",
    "cluster.local/nfs-subdir-external-provisioner",
    "nfs-provisioner",
    "efs.csi.aws.com",
    "filestore.csi.storage.gke.io",
    "file.csi.azure.com",
    "kubernetes.io/azure-file",
    "cephfs.csi.ceph.com",
    "kubernetes.io/cephfs",
    "kubernetes.io/glusterfs",
    "fsx.csi.aws.com",
}
# Provisioners whose volumes attach to one node at a time: no ReadWriteMany.
BLOCK_ONLY_PROVISIONERS = {
    "ebs.csi.aws.com",
    "kubernetes.io/aws-ebs",
    "pd.csi.storage.gke.io",
    "kubernetes.io/gce-pd",
    "disk.csi.azure.com",
    "kubernetes.io/azure-disk",
}
NETWORK_FS_NAME = re.compile(r"nfs|efs|filestore|azurefile|azure-file|cephfs|gluster|rwx", re.I)

# What a ReadWriteOnce claim holds, for the message (claim template name, StatefulSet).
HOLDS = {
    ("data", "redis"): "Redis's append-only file (appendfsync always: an fsync per write)",
    ("events", "northstar-log-writer"): (
        "the SQLite event log (its WAL needs POSIX locks and shared memory on one node)"
    ),
}


@dataclass(frozen=True)
class Claim:
    where: str  # PersistentVolumeClaim/x or StatefulSet/y volumeClaimTemplates[z]
    modes: tuple[str, ...]
    storage_class: str | None
    holds: str


def render(target: str | Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("kubectl is not installed: cannot render the overlay")
    out = subprocess.run(
        [kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {target}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def claims(objs: Iterable[dict]) -> list[Claim]:
    out = []
    for obj in objs:
        name = obj["metadata"]["name"]
        if obj["kind"] == "PersistentVolumeClaim":
            spec = obj["spec"]
            out.append(
                Claim(
                    f"PersistentVolumeClaim/{name}",
                    tuple(spec.get("accessModes", ())),
                    spec.get("storageClassName"),
                    HOLDS.get((name, ""), f"claim {name}"),
                )
            )
        elif obj["kind"] == "StatefulSet":
            for t in obj["spec"].get("volumeClaimTemplates", []):
                tname, spec = t["metadata"]["name"], t["spec"]
                out.append(
                    Claim(
                        f"StatefulSet/{name} volumeClaimTemplates[{tname}]",
                        tuple(spec.get("accessModes", ())),
                        spec.get("storageClassName"),
                        HOLDS.get((tname, name), f"{name}'s claim {tname}"),
                    )
                )
    return out


def is_network_fs(name: str, sc: dict | None) -> bool:
    if sc is None:
        return bool(NETWORK_FS_NAME.search(name))
    params = {str(k).lower(): str(v).lower() for k, v in (sc.get("parameters") or {}).items()}
    return (
        sc.get("provisioner", "") in NETWORK_FS_PROVISIONERS
        or "nfs" in sc.get("provisioner", "").lower()
        or params.get("protocol") == "nfs"
    )


def check_storage(objs: list[dict], classes: dict[str, dict] | None = None) -> list[str]:
    """Refusals for the rendered objects' claims. `classes`: StorageClass objects by name
    (the cluster's), or None to judge by the class names alone."""
    errors = []
    for c in claims(objs):
        if not c.storage_class:
            errors.append(
                f"{c.where}: no storageClassName; set the overlay's storage-classes.yaml "
                "(deploy/components/storage-classes)"
            )
            continue
        sc = None
        if classes is not None:
            sc = classes.get(c.storage_class)
            if sc is None:
                errors.append(
                    f"{c.where}: storage class {c.storage_class!r} does not exist "
                    f"(the cluster has: {', '.join(sorted(classes)) or 'none'})"
                )
                continue
        if "ReadWriteOnce" in c.modes and is_network_fs(c.storage_class, sc):
            how = f"provisioner {sc.get('provisioner')}" if sc else "its name says so"
            errors.append(
                f"{c.where}: storage class {c.storage_class!r} is a network filesystem "
                f"({how}); it holds {c.holds}, which needs local block storage (an SSD "
                "ReadWriteOnce class): set `local` in the overlay's storage-classes.yaml"
            )
        if "ReadWriteMany" in c.modes and sc and sc.get("provisioner") in BLOCK_ONLY_PROVISIONERS:
            errors.append(
                f"{c.where}: storage class {c.storage_class!r} ({sc['provisioner']}) cannot "
                "give ReadWriteMany; the claim would stay Pending: set `shared` in the "
                "overlay's storage-classes.yaml to an NFS / EFS / Filestore / Azure Files class"
            )
    return errors


def check_images(objs: list[dict]) -> list[str]:
    text = yaml.safe_dump_all(objs)
    found = sorted(set(re.findall(rf"image: ({re.escape(PLACEHOLDER_REGISTRY)}/\S+)", text)))
    return [
        f"image {image}: the placeholder registry; set your registry in "
        "deploy/components/images/kustomization.yaml"
        for image in found
    ]


def cluster_classes() -> dict[str, dict]:
    out = subprocess.run(
        ["kubectl", "get", "storageclass", "-o", "json"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"kubectl get storageclass: {out.stderr.strip()}")
    return {sc["metadata"]["name"]: sc for sc in json.loads(out.stdout)["items"]}


def file_classes(path: str | Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    items = [i for d in docs for i in (d.get("items") or [d])]
    return {sc["metadata"]["name"]: sc for sc in items if sc.get("kind") == "StorageClass"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a kustomization folder: deploy/overlays/cpu or gpu")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cluster", action="store_true", help="read the current context's classes")
    src.add_argument("--storage-classes", help="a YAML file of StorageClass objects")
    p.add_argument(
        "--allow-placeholder-images", action="store_true", help="skip the registry check"
    )
    args = p.parse_args(argv)
    objs = render(args.target)
    classes = None
    if args.cluster:
        classes = cluster_classes()
    elif args.storage_classes:
        classes = file_classes(args.storage_classes)
    errors = check_storage(objs, classes)
    if not args.allow_placeholder_images:
        errors += check_images(objs)
    for e in errors:
        print(f"refused: {e}", file=sys.stderr)
    if not errors:
        how = "the cluster's classes" if classes is not None else "class names only"
        print(f"{args.target}: storage and images ok ({how})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
