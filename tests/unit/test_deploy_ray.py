"""deploy/ray: the lake writer, the join's RayCluster and its CronJob, rendered offline.

Rendered with `kubectl kustomize` and checked as tests/unit/test_deploy_manifests.py checks
the overlays: every object of a built-in kind validates against the Kubernetes schemas
(strict). The RayCluster is a KubeRay custom resource, which kubernetes-validate has no
schema for (it ships the core API only), so its pod templates are checked field by field
with the same policies instead.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "deploy" / "ray"
VERSIONS = ("1.27", "1.31")
KUBERAY_API = "ray.io/v1"


def _render() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render deploy/ray")
    out = subprocess.run(
        [kubectl, "kustomize", str(TARGET)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return _render()


def _one(objs: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def _pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "StatefulSet":
            out.append((name, o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            out.append((name, o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif o["kind"] == "RayCluster":
            out.append((f"{name}/head", o["spec"]["headGroupSpec"]["template"]["spec"]))
            for g in o["spec"]["workerGroupSpecs"]:
                out.append((f"{name}/{g['groupName']}", g["template"]["spec"]))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_built_in_objects_validate_against_the_kubernetes_schemas(objs, version):
    import kubernetes_validate

    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "CronJob", "NetworkPolicy", "RayCluster"} <= kinds
    for obj in objs:
        if obj["apiVersion"] == KUBERAY_API:
            continue  # a custom resource: checked field by field below
        kubernetes_validate.validate(obj, version, strict=True)


def test_pods_follow_the_deployment_policies(objs):
    specs = _pod_specs(objs)
    assert len(specs) == 4  # lake writer, submitter, Ray head, Ray workers
    for where, spec in specs:
        assert spec.get("automountServiceAccountToken") is False, where
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == 1000, where
        for c in spec["containers"]:
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: {image}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where
            env = {e["name"]: e for e in c.get("env", [])}
            for name, e in env.items():
                if "TOKEN" in name or "PASSWORD" in name:
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {name} literal"


def test_the_ray_cluster_shares_the_state_volume_and_authenticates(objs):
    rc = _one(objs, "RayCluster", "northstar-join")
    assert rc["spec"]["rayVersion"] == "2.60.0"  # the version in pyproject.toml
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for where, spec in _pod_specs([rc]):
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"canary-state"}, where
        (c,) = spec["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "northstar-ray-token"
        assert spec["volumes"][-1] == {
            "name": "shm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": spec["volumes"][-1]["emptyDir"]["sizeLimit"],
            },
        }


def _parse(argv: list[str]):
    from northstar.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"northstar {shlex.join(argv)}: the CLI refuses it") from exc


def test_the_cronjob_submits_the_ray_join_to_the_cluster_on_the_lake(objs):
    cj = _one(objs, "CronJob", "northstar-join-ray")
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    argv = c["command"] + c["args"]
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://northstar-join-head-svc:8265"
    entry = argv[argv.index("--") + 1 :]
    assert entry[0] == "northstar"
    args = _parse(entry[1:])
    assert (args.engine, args.log, args.address) == ("ray", "/state/lake", None)
    writer = _one(objs, "StatefulSet", "northstar-lake-writer")
    (w,) = writer["spec"]["template"]["spec"]["containers"]
    wargs = _parse(w["args"])
    assert wargs.log == args.log and wargs.group == "lake"
    assert writer["spec"]["replicas"] == 1  # one writer per lake
    url = {e["name"]: e.get("value", "") for e in w["env"]}["NORTHSTAR_EVENT_LOG"]
    assert "lake" in url.split("groups=")[1].split("&")[0].split(",")
