"""deploy/: the Kubernetes manifests, rendered and checked offline (no cluster here).

Each overlay is rendered with `kubectl kustomize` and every object is validated against
the Kubernetes 1.31 schemas (strict: unknown fields fail) with `kubernetes-validate`; then
the policies the deployment promises are checked on the rendered objects. Each policy
check is written so that breaking the policy in a manifest fails it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.31"
TARGETS = ("overlays/cpu", "overlays/gpu", "bootstrap")
# Triton's own metric names (its metrics port); the HPA scales on their ratio.
TRITON_QUEUE = "nv_inference_queue_duration_us"
TRITON_EXECS = "nv_inference_exec_count"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render deploy/")
    return path


_RENDERED: dict[str, list[dict]] = {}


def render(target: str) -> list[dict]:
    if target not in _RENDERED:
        out = subprocess.run(
            [_kubectl(), "kustomize", str(DEPLOY / target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, f"kubectl kustomize deploy/{target}: {out.stderr}"
        _RENDERED[target] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _RENDERED[target]


def _name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict) -> dict | None:
    kind = obj["kind"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    if kind == "Pod":
        return obj["spec"]
    return None


def containers(objs: list[dict]):
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield obj, spec, c


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_kubernetes_schemas(target):
    import kubernetes_validate

    objs = render(target)
    assert objs, f"deploy/{target} renders nothing"
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{_name(obj)}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_refuses_a_broken_object():
    """The validator really runs strict: an unknown field and a wrong type both fail."""
    import kubernetes_validate

    pdb = one(render("overlays/cpu"), "PodDisruptionBudget", "triton")
    bad = {**pdb, "spec": {**pdb["spec"], "maxUnavailabel": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    svc = one(render("overlays/cpu"), "Service", "triton")
    bad = {**svc, "spec": {**svc["spec"], "ports": [{"port": "eight thousand"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# ----------------------------------------------------------------------------- policies


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned_by_tag(target):
    for obj, _, c in containers(render(target)):
        image = c["image"]
        ref = image.split("@", 1)[0]
        name, _, tag = ref.rpartition(":")
        if "/" in tag or not name:  # a registry port, not a tag
            tag = ""
        assert tag or "@sha256:" in image, f"{_name(obj)}/{c['name']}: untagged image {image}"
        assert tag != "latest", f"{_name(obj)}/{c['name']}: image {image} uses latest"


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target):
    for obj, _, c in containers(render(target)):
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for what in ("cpu", "memory"):
                assert what in res.get(kind, {}), f"{_name(obj)}/{c['name']}: no {kind}.{what}"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_non_root_read_only_without_privileges(target):
    for obj, spec, c in containers(render(target)):
        where = f"{_name(obj)}/{c['name']}"
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert uid is not None and uid != 0, f"{where}: needs a numeric non-root runAsUser"
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert not sc.get("privileged", False), where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("capabilities", {}).get("add"), where
        assert spec.get("automountServiceAccountToken") is False, where
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


SECRETISH = re.compile(r"(KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|URI|DSN)", re.I)


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_values_in_env_literals(target):
    """A secret-looking variable comes from a secretKeyRef or names a mounted file."""
    for obj, _, c in containers(render(target)):
        for env in c.get("env", []):
            where = f"{_name(obj)}/{c['name']} env {env['name']}"
            assert "configMapKeyRef" not in env.get("valueFrom", {}) or not SECRETISH.search(
                env["name"]
            ), f"{where}: a secret from a ConfigMap"
            if "value" not in env:
                continue
            value = str(env["value"])
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{where}: password in a URL"
            if SECRETISH.search(env["name"]) and env["name"] != "MLFLOW_SERVER_ALLOWED_HOSTS":
                assert env["name"].endswith("_FILE") and value.startswith("/run/secrets/"), (
                    f"{where}: a literal value; use valueFrom.secretKeyRef or a *_FILE path"
                )
        for src in c.get("envFrom", []):
            assert "secretRef" in src, f"{_name(obj)}: envFrom a ConfigMap may hide secrets"


@pytest.mark.parametrize("target", TARGETS)
def test_configmaps_hold_no_secrets(target):
    for obj in render(target):
        if obj["kind"] != "ConfigMap":
            continue
        for key, text in obj.get("data", {}).items():
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", text), f"{_name(obj)} {key}"
            assert not re.search(r"(password|admin_key|secret)\s*[:=]", text, re.I), (
                f"{_name(obj)} {key}: a secret in a ConfigMap"
            )
        assert not [o for o in render(target) if o["kind"] == "Secret"], (
            "Secrets are created by hand from files (deploy/README.md), never committed"
        )


def _triton(target: str) -> tuple[dict, dict, dict]:
    objs = render(target)
    sts = one(objs, "StatefulSet", "triton")
    spec = pod_spec(sts)
    (c,) = [c for c in spec["containers"] if c["name"] == "triton"]
    return sts, spec, c


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_triton_probes_ports_and_mounts(target):
    _, spec, c = _triton(target)
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] in ("/v2/health/live", "/v2/health/ready")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8002}  # http and gRPC are the proxy's (below)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == 8000, f"{probe}: through the proxy"
    # The image's entrypoint adds the restricted-API flags from this file, or refuses.
    assert "command" not in c, "keep the image's ENTRYPOINT (python3 -m serving.auth exec)"
    env = {e["name"]: e for e in c["env"]}
    key_path = env["NORTHSTAR_ADMIN_KEY_FILE"]["value"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    key_mount = mounts[str(Path(key_path).parent)]
    assert key_mount["readOnly"] is True
    assert vols[key_mount["name"]]["secret"]["secretName"] == "northstar-admin-key"
    args = c["args"]
    assert args[0] == "tritonserver" and "--model-control-mode=explicit" in args
    assert "--strict-readiness=true" in args
    assert "--metrics-config=summary_latencies=true" in args
    assert not [a for a in args if "restricted" in a], "the key never appears in the manifest"
    # Shared model repository, read-only for Triton; shm for the Python backend.
    repo = mounts["/models"]
    assert repo["readOnly"] is True
    claim = vols[repo["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = one(render(target), "PersistentVolumeClaim", claim)
    assert set(pvc["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"}
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in vols[mounts["/tmp"]["name"]]
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) if target.endswith("gpu") else gpus is None


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_triton_is_reached_only_through_the_body_bounding_proxy(target):
    from serving.proxy import K8S_SIDECAR, ProxyLimits, render_config

    objs = render(target)
    _, spec, triton = _triton(target)
    args = triton["args"]
    assert "--http-address=127.0.0.1" in args and "--grpc-address=127.0.0.1" in args
    assert f"--http-port={K8S_SIDECAR['http_upstream']}" in args
    assert f"--grpc-port={K8S_SIDECAR['grpc_upstream']}" in args
    (proxy,) = [c for c in spec["containers"] if c["name"] == "proxy"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"http": K8S_SIDECAR["http_port"], "grpc": K8S_SIDECAR["grpc_port"]}
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    conf_name = vols["proxy-config"]["configMap"]["name"]
    conf = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == conf_name]
    assert proxy["command"][:3] == ["nginx", "-c", f"{mounts['proxy-config']}/nginx.conf"]
    # The committed config is what the template renders today: re-render after an edit
    # with `python -m serving.proxy > deploy/base/proxy/nginx.conf`.
    assert conf[0]["data"]["nginx.conf"] == render_config(**K8S_SIDECAR, limits=ProxyLimits())
    assert mounts["proxy-tmp"] == K8S_SIDECAR["run_dir"]


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_each_replica_has_its_own_event_log(target):
    """SQLite's WAL is never shared across pods: a per-pod ReadWriteOnce claim."""
    sts, spec, c = _triton(target)
    env = {e["name"]: e.get("value") for e in c["env"]}
    log_dir = str(Path(env["NORTHSTAR_EVENT_LOG"]).parent)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == log_dir]
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in templates, "the event log must be on a per-pod claim"
    assert templates[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount["name"] not in {v["name"] for v in spec.get("volumes", [])}
    # Scale-in keeps the claims: acknowledged events outlive the pod.
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    # Nobody else mounts a Triton log except replica 0's, next to it (same node).
    for obj, pspec, _ in containers(render(target)):
        for v in pspec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName", "")
            if claim.startswith(f"{mount['name']}-triton-"):
                assert claim == f"{mount['name']}-triton-0", _name(obj)
                terms = pspec["affinity"]["podAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]
                assert any(
                    t["topologyKey"] == "kubernetes.io/hostname"
                    and t["labelSelector"]["matchLabels"].get("statefulset.kubernetes.io/pod-name")
                    == "triton-0"
                    for t in terms
                ), f"{_name(obj)} mounts {claim} but may run on another node"


def test_service_and_disruption_budget():
    objs = render("overlays/cpu")
    svc = one(objs, "Service", "triton")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    sts = one(objs, "StatefulSet", "triton")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    headless = one(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    pdb = one(objs, "PodDisruptionBudget", "triton")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_cronjobs_forbid_overlap_and_use_the_key_file_and_config(target):
    objs = render(target)
    jobs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "CronJob"}
    assert set(jobs) == {"northstar-retrain", "northstar-canary-evaluate"}
    cm = one(objs, "ConfigMap", "northstar-loop")
    for name, job in jobs.items():
        assert job["spec"]["concurrencyPolicy"] == "Forbid", name
        tmpl = job["spec"]["jobTemplate"]["spec"]["template"]
        assert tmpl["metadata"]["labels"]["northstar.io/role"] == "control"
        spec = tmpl["spec"]
        (c,) = spec["containers"]
        args = c["args"]
        assert "--config" in args, name
        cfg_file = Path(args[args.index("--config") + 1])
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert (
            vols[mounts[str(cfg_file.parent)]["name"]]["configMap"]["name"]
            == cm["metadata"]["name"]
        )
        assert cfg_file.name in cm["data"], f"{name}: {cfg_file.name} not in the ConfigMap"
        env = {e["name"]: e.get("value") for e in c["env"]}
        key_dir = str(Path(env["NORTHSTAR_ADMIN_KEY_FILE"]).parent)
        assert vols[mounts[key_dir]["name"]]["secret"]["secretName"] == "northstar-admin-key"
    assert (
        jobs["northstar-retrain"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][
            0
        ]["args"][0]
        == "retrain"
    )
    evaluate = jobs["northstar-canary-evaluate"]["spec"]["jobTemplate"]["spec"]["template"]
    assert evaluate["spec"]["containers"][0]["args"][:3] == ["canary", "evaluate", "--auto"]
    gpu = (
        "target=gpu"
        in jobs["northstar-retrain"]["spec"]["jobTemplate"]["spec"]["template"]["spec"][
            "containers"
        ][0]["args"]
    )
    assert gpu == target.endswith("gpu"), "the gpu overlay's retrains export the gpu target"


def test_the_loop_configs_load_as_the_cli_would():
    """The ConfigMap's files are valid RetrainConfig / EvaluateConfig, aimed at Triton."""
    from canary.online import EvaluateConfig
    from canary.pipeline import RetrainConfig
    from common import config as config_mod

    objs = render("overlays/cpu")
    cm = one(objs, "ConfigMap", "northstar-loop")
    services = {o["metadata"]["name"] for o in objs if o["kind"] == "Service"}
    for key, cls in (("retrain.yaml", RetrainConfig), ("evaluate.yaml", EvaluateConfig)):
        cfg = config_mod.build(cls, yaml.safe_load(cm["data"][key]))
        host, port = cfg.url.rsplit(":", 1)
        assert port == "8001", f"{key}: url must be Triton's gRPC port"
        assert host.split(".")[-1] in services or host in services, f"{key}: {host}"
        assert cfg.tracking_uri and cfg.tracking_uri.startswith("http://mlflow:")
        assert cfg.state_dir == "/state" and cfg.repo == "/models"


def test_mlflow_uses_a_database_from_a_secret():
    objs = render("overlays/cpu")
    dep = one(objs, "Deployment", "mlflow")
    (c,) = pod_spec(dep)["containers"]
    assert c["command"][:2] == ["mlflow", "server"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mlflow-db", "key": "uri"}
    assert not [a for a in c["args"] if "backend-store-uri" in a or "://" in a]


def test_network_policy_splits_control_jobs_from_clients():
    objs = render("overlays/cpu")
    pol = one(objs, "NetworkPolicy", "triton")
    assert pol["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}
    by_role = {}
    for rule in pol["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        for peer in rule["from"]:
            role = peer.get("podSelector", {}).get("matchLabels", {}).get("northstar.io/role")
            by_role.setdefault(role, set()).update(ports)
            assert peer.get("podSelector") or peer.get("namespaceSelector"), "no open rule"
    assert by_role["control"] == {8000, 8001, 8002}
    assert by_role["client"] <= {8000, 8001}
    # Everything else in the namespace is closed by default.
    deny = one(objs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]


# ----------------------------------------------------------------------------- autoscaling


def _adapter_rules() -> list[dict]:
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    return values["rules"]["custom"]


def test_hpa_metric_matches_the_adapter_rule():
    hpa = one(render("overlays/cpu"), "HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "triton",
    }
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    exposed = {r["name"]["as"] for r in _adapter_rules()}
    assert names and names <= exposed, f"HPA metrics {names} vs adapter rules {exposed}"
    assert hpa["spec"]["minReplicas"] >= 2


def test_adapter_rule_divides_triton_queue_time_by_executions():
    (rule,) = [r for r in _adapter_rules() if r["name"]["as"] == "triton_queue_ms_per_execution"]
    query = " ".join(rule["metricsQuery"].split())
    used = set(re.findall(r"\b(nv_[a-z_]+)\b", query + rule["seriesQuery"]))
    assert used == {TRITON_QUEUE, TRITON_EXECS}, used
    # rate(queue µs) / (rate(executions) * 1000) = ms per execution, over one minute.
    num, _, den = query.partition("by (<<.GroupBy>>) / (")
    assert f"rate({TRITON_QUEUE}{{<<.LabelMatchers>>}}[1m])" in num
    assert f"rate({TRITON_EXECS}{{<<.LabelMatchers>>}}[1m])" in den and den.rstrip().endswith(
        "* 1000)"
    )
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


# Triton 2.51's inference metrics (docs/user_guide/metrics.md of the server). The pytriton
# binary builds the names at run time, so they cannot be read out of it; the two the
# autoscaler uses are checked on a live server's endpoint in
# tests/integration/test_serving_health.py.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_inference_request_summary_us",
    "nv_inference_queue_summary_us",
}


def test_the_rule_reads_only_metrics_triton_exports():
    for rule in _adapter_rules():
        text = rule["seriesQuery"] + " " + rule["metricsQuery"]
        used = set(re.findall(r"\b(nv_[a-z_]+)\b", text))
        assert used, f"rule {rule['name']['as']} reads no Triton metric"
        assert used <= TRITON_METRICS, f"not Triton metrics: {sorted(used - TRITON_METRICS)}"


# ----------------------------------------------------------------------------- the README


def test_readme_says_what_was_validated_and_the_join_inputs():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "kubectl apply -k deploy/overlays/cpu",
        "kubectl create secret generic northstar-admin-key",
        "/v2/health/ready",
        "events-triton-",
        "s3://",
        "Redis",
        "not run",
    ):
        assert needle in text, f"deploy/README.md lacks {needle!r}"
    dev = re.search(r"^dev = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert dev and '"kubernetes-validate==' in dev.group(1), "pin the schema checker in dev"
