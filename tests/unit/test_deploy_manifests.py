"""deploy/: the Kubernetes manifests, rendered and checked offline (no cluster here).

Each overlay is rendered with `kubectl kustomize` and every object is validated against
the Kubernetes 1.27 (the oldest the README supports) and 1.31 schemas (strict: unknown
fields fail) with `kubernetes-validate`; the Prometheus operator's objects, which those
schemas do not cover, are checked field by field and their rules with promtool. Then the
policies the deployment promises are checked on the rendered objects. Each policy check is
written so that breaking the policy in a manifest fails it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common import procs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.31"
# The oldest Kubernetes the manifests support (deploy/README.md): CronJob.spec.timeZone is
# GA and StatefulSet PVC retention is on by default from 1.27.
KUBERNETES_MIN_VERSION = "1.27"
# Custom resources of the Prometheus operator (kube-prometheus-stack's CRDs).
MONITORING_API = "monitoring.coreos.com/v1"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
TARGETS = ("overlays/cpu", "overlays/gpu", "bootstrap")
# Triton's own metric names (its metrics port); the HPA scales on their ratio.
TRITON_QUEUE = "nv_inference_queue_duration_us"
TRITON_EXECS = "nv_inference_exec_count"
TRITON_REQUESTS = "nv_inference_request_success"
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


@pytest.mark.parametrize("version", [KUBERNETES_MIN_VERSION, KUBERNETES_VERSION])
@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_kubernetes_schemas(target, version):
    import kubernetes_validate

    objs = render(target)
    assert objs, f"deploy/{target} renders nothing"
    errors = []
    for obj in objs:
        if obj["apiVersion"] == MONITORING_API:
            assert obj["kind"] in MONITORING_KINDS, _name(obj)
            continue  # no schema here: test_monitoring_objects_are_well_formed
        try:
            kubernetes_validate.validate(obj, version, strict=True)
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


# A password in a URL is only ever a reference to a variable: `redis://:$(REDIS_PASSWORD)@`.
URL_PASSWORD = re.compile(r"://[^/@\s]*:(?P<password>[^/@\s]+)@")


def secret_vars(c: dict) -> dict[str, dict]:
    """The container's variables that come from a Secret: name -> secretKeyRef."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_values_in_env_literals(target):
    """A secret-looking variable comes from a secretKeyRef or names a mounted file; a
    password inside a URL is a $(VAR) of a variable from a Secret, defined before it."""
    for obj, _, c in containers(render(target)):
        secret = secret_vars(c)
        defined: list[str] = []
        for env in c.get("env", []):
            defined.append(env["name"])
            where = f"{_name(obj)}/{c['name']} env {env['name']}"
            assert "configMapKeyRef" not in env.get("valueFrom", {}) or not SECRETISH.search(
                env["name"]
            ), f"{where}: a secret from a ConfigMap"
            if "value" not in env:
                continue
            value = str(env["value"])
            for m in URL_PASSWORD.finditer(value):
                ref = re.fullmatch(r"\$\((\w+)\)", m["password"])
                assert ref, f"{where}: a literal password in a URL"
                assert ref[1] in secret, f"{where}: $({ref[1]}) is not from a Secret"
                assert ref[1] in defined[:-1], f"{where}: $({ref[1]}) is defined after it"
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
            assert not URL_PASSWORD.search(text), f"{_name(obj)} {key}"
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


REDIS_URL = re.compile(
    r"^redis://(:(?P<password>[^@/]+)@)?(?P<host>[^:/?@]+):(?P<port>\d+)/\d+(\?.*)?$"
)
# What tests put where the kubelet puts a Secret's value ($(VAR) of a secretKeyRef variable).
SECRET_VALUE = "secretvalue"


def expanded_env(c: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: literal values with $(VAR)
    of earlier variables expanded; a Secret's variable reads SECRET_VALUE."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(e["value"]))
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = SECRET_VALUE
    return env


def expanded_args(c: dict) -> list[str]:
    """`args` with the kubelet's $(VAR) expansion."""
    env = expanded_env(c)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(a)) for a in c["args"]]


def _redis_host_port(url: str) -> tuple[str, int]:
    m = REDIS_URL.match(url)
    assert m, f"{url}: not a redis://host:port/db URL"
    return m["host"], int(m["port"])


def _assert_is_the_redis_service(objs: list[dict], url: str) -> None:
    """`url` names the Service `redis` by its port, and that Service selects the Redis pod."""
    host, port = _redis_host_port(url)
    svc = one(objs, "Service", host)
    assert port in {p["port"] for p in svc["spec"]["ports"]}, url
    redis = one(objs, "StatefulSet", "redis")
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), f"{host} does not select Redis"


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_triton_writes_events_and_reads_features_through_the_redis_service(target):
    """No per-pod state: events go to the Redis stream, users come from the online store."""
    from feedback.stream import StreamConfig
    from online.config import OnlineStoreConfig

    objs = render(target)
    sts, _, c = _triton(target)
    env = expanded_env(c)
    stream = StreamConfig.from_url(env["NORTHSTAR_EVENT_LOG"])
    _assert_is_the_redis_service(objs, stream.url)
    assert "log" in stream.groups, "the log writer's group must exist from the first XADD"
    store = OnlineStoreConfig(url=env["NORTHSTAR_ONLINE_STORE"])
    _assert_is_the_redis_service(objs, store.url)
    # The per-replica SQLite log is gone: no claim template, no log mount, nobody mounts
    # an old `events-triton-<i>` claim.
    assert not sts["spec"].get("volumeClaimTemplates")
    assert "/var/lib/northstar" not in {m["mountPath"] for m in c["volumeMounts"]}
    for obj, pspec, _ in containers(objs):
        for v in pspec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName", "")
            assert not claim.startswith("events-triton-"), f"{_name(obj)} mounts {claim}"


def _parse_cli(argv: list[str]):
    """`northstar ARGV` as the CLI parses it (argparse exits on an unknown flag)."""
    from northstar.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # pragma: no cover - the message is on stderr
        raise AssertionError(f"northstar {' '.join(argv)}: the CLI refuses it") from exc


def northstar_commands(c: dict) -> list[list[str]]:
    """Every `northstar` invocation a container runs: its args (the retrain image's
    ENTRYPOINT is `northstar`), or each `northstar ...` line of an `sh -c` script, with
    the container's literal env values substituted for $VAR / "$VAR"."""
    import shlex

    if "northstar/retrain" not in c["image"]:
        return []
    if "command" not in c:
        return [expanded_args(c)]
    if c["command"][0] not in ("/bin/sh", "sh"):
        return []  # another program of the image (MLflow's server)
    assert c["command"][1] in ("-c", "-ec"), c["command"]
    script = "\n".join(c.get("args", [])) if len(c["command"]) == 2 else c["command"][2]
    env = expanded_env(c)
    out = []
    for line in script.splitlines():
        line = line.strip().split(" || ")[0]
        if not line.startswith("northstar "):
            continue
        for name, value in env.items():
            line = line.replace(f'"${name}"', value).replace(f"${name}", value)
        assert "$" not in line, f"{line}: an unexpanded variable"
        out.append(shlex.split(line)[1:])
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_every_northstar_command_parses_with_the_real_cli(target):
    """Consumers, the join, the CronJobs, the bootstrap: what the pods run is a command
    the CLI of this checkout accepts (flags renamed in code fail here, not in the cluster)."""
    seen = 0
    for _obj, _, c in containers(render(target)):
        for argv in northstar_commands(c):
            _parse_cli(argv)
            seen += 1
    assert seen, f"deploy/{target} runs no northstar command?"


def _consumers(objs: list[dict]) -> list[tuple[dict, dict, object]]:
    out = []
    for obj, _, c in containers(objs):
        for argv in northstar_commands(c):
            args = _parse_cli(argv)
            if args.command == "feedback" and args.feedback_command == "consume":
                out.append((obj, c, args))
    return out


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_one_active_consumer_per_group(target):
    """The log writer and the features consumer: each group has exactly one workload, of
    one pod, that never runs beside its replacement (feedback/README.md: one active log
    writer), under a fixed consumer name, and nothing scales them."""
    objs = render(target)
    by_group: dict[str, list] = {}
    for obj, c, args in _consumers(objs):
        by_group.setdefault(args.group or "log", []).append((obj, c, args))
    assert set(by_group) == {"log", "features"}, sorted(by_group)
    scaled = {
        o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"
    }
    for group, found in by_group.items():
        assert len(found) == 1, f"group {group}: {[_name(o) for o, _, _ in found]}"
        (obj, c, args) = found[0]
        where = f"{_name(obj)} (group {group})"
        assert obj["spec"]["replicas"] == 1, where
        assert obj["metadata"]["name"] not in scaled, f"{where}: an HPA would add consumers"
        if obj["kind"] == "Deployment":
            assert obj["spec"]["strategy"]["type"] == "Recreate", where
        else:
            # A StatefulSet never runs two pods of one ordinal; one replica, ordered.
            assert obj["kind"] == "StatefulSet", where
            assert obj["spec"].get("podManagementPolicy", "OrderedReady") == "OrderedReady"
            assert obj["spec"]["updateStrategy"]["type"] == "RollingUpdate", where
            assert "rollingUpdate" not in obj["spec"]["updateStrategy"], where
        assert args.consumer, f"{where}: a fixed --consumer name, stable across restarts"
        assert "command" not in c, f"{where}: the image's ENTRYPOINT (northstar) runs it"
        assert args.metrics_port, f"{where}: lag on --metrics-port"
        assert args.metrics_port in {p["containerPort"] for p in c["ports"]}, where
    (_, _, log) = by_group["log"][0]
    (_, _, features) = by_group["features"][0]
    assert log.log and not log.online_store
    assert features.online_store and not features.log
    _assert_is_the_redis_service(objs, features.online_store)


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_producers_and_consumers_agree_on_the_stream(target):
    """Same Redis, prefix, partitions and groups; every consumer's group is created by
    the producers (so its entries are kept before its consumer first runs)."""
    from feedback.stream import StreamConfig

    objs = render(target)
    _, _, triton = _triton(target)
    produced = StreamConfig.from_url(expanded_env(triton)["NORTHSTAR_EVENT_LOG"])
    consumers = _consumers(objs)
    assert consumers
    for obj, _, args in consumers:
        assert StreamConfig.from_url(args.url) == produced, _name(obj)
        assert (args.group or "log") in produced.groups, _name(obj)


def _log_writer(objs: list[dict]) -> tuple[dict, dict, object]:
    (found,) = [(o, c, a) for o, c, a in _consumers(objs) if (a.group or "log") == "log"]
    return found


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_the_sqlite_log_never_leaves_the_log_writer_pod(target):
    """SQLite's WAL is never shared across nodes: the log is the log writer's own RWO claim,
    and the only other process that opens it is the join in the same pod, which writes
    the labels the CronJobs read (they have no event_log)."""
    from canary.online import EvaluateConfig
    from canary.pipeline import RetrainConfig
    from common import config as config_mod

    objs = render(target)
    sts, writer, args = _log_writer(objs)
    assert sts["kind"] == "StatefulSet"
    spec = pod_spec(sts)
    log_dir = str(Path(args.log).parent)
    (mount,) = [m for m in writer["volumeMounts"] if m["mountPath"] == log_dir]
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in templates, "the log must be on the pod's own claim"
    assert templates[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount["name"] not in {v["name"] for v in spec.get("volumes", [])}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Retain",
        "whenDeleted": "Retain",
    }
    claim_prefix = f"{mount['name']}-{sts['metadata']['name']}-"
    # The join: in this pod, on the same file, into the shared labels folder.
    joins = []
    for obj, pspec, c in containers(objs):
        for argv in northstar_commands(c):
            parsed = _parse_cli(argv)
            if parsed.command == "feedback" and parsed.feedback_command == "join":
                joins.append((obj, pspec, c, parsed))
        for v in pspec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName", "")
            assert not claim.startswith(claim_prefix), f"{_name(obj)} mounts the log's claim"
    ((obj, pspec, join, jargs),) = joins
    assert obj is sts, f"the join runs in {_name(obj)}, not beside the log writer"
    assert jargs.log == args.log
    jmounts = {m["mountPath"]: m for m in join["volumeMounts"]}
    assert jmounts[log_dir]["name"] == mount["name"] and not jmounts[log_dir].get("readOnly")
    from feedback.join import parse_duration

    window = parse_duration(jargs.window)
    labels_claim = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    out_mount = max(
        (m for m in join["volumeMounts"] if jargs.out.startswith(m["mountPath"] + "/")),
        key=lambda m: len(m["mountPath"]),
    )
    join_claim = labels_claim[out_mount["name"]]
    pvc = one(objs, "PersistentVolumeClaim", join_claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "the CronJobs read the labels too"
    # The CronJobs read those labels, with the join's window, and never join themselves.
    cm = one(objs, "ConfigMap", "northstar-loop")
    for key, cls in (("retrain.yaml", RetrainConfig), ("evaluate.yaml", EvaluateConfig)):
        cfg = config_mod.build(cls, yaml.safe_load(cm["data"][key]))
        assert cfg.event_log is None, f"{key}: the join runs beside the log writer"
        assert cfg.labels == jargs.out, key
        assert cfg.join_window_s == window, f"{key}: the labels folder keeps one window"
    for job in (o for o in objs if o["kind"] == "CronJob"):
        jspec = pod_spec(job)
        (c,) = jspec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in jspec["volumes"]
            if "persistentVolumeClaim" in v
        }
        labels_dir = str(Path(jargs.out).parent)
        assert claims[mounts[labels_dir]] == join_claim, f"{_name(job)}: another labels volume"
        assert "affinity" not in jspec, f"{_name(job)}: no longer tied to a node"


# ----------------------------------------------------------------------------- Redis


def _redis(objs: list[dict]) -> tuple[dict, dict, dict]:
    sts = one(objs, "StatefulSet", "redis")
    spec = pod_spec(sts)
    (c,) = spec["containers"]
    return sts, spec, c


def _redis_script(c: dict) -> str:
    """Redis's start script: `exec redis-server CONF -` with the password on stdin."""
    assert c["command"][:2] == ["sh", "-c"], c["command"]
    return c["command"][2]


def _redis_conf_path(c: dict) -> Path:
    m = re.search(r"^exec redis-server (\S+\.conf) - <<", _redis_script(c), re.M)
    assert m, "redis-server must be exec'd on the mounted config, the rest from stdin"
    return Path(m[1])


def _redis_conf(objs: list[dict]) -> tuple[str, dict[str, str]]:
    """redis.conf as mounted (the file the container's command names) and its directives."""
    _, spec, c = _redis(objs)
    conf_path = _redis_conf_path(c)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    mount = mounts[str(conf_path.parent)]
    assert mount.get("readOnly") is True
    cm = one(objs, "ConfigMap", vols[mount["name"]]["configMap"]["name"])
    text = cm["data"][conf_path.name]
    directives = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives[key.lower()] = value.strip()
    return text, directives


def _redis_bytes(size: str) -> int:
    """redis.conf's units: k/m/g are powers of 1000, kb/mb/gb of 1024 (case-insensitive)."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", size)
    assert m, size
    return int(m[1]) * units.get(m[2].lower(), 1)


def _k8s_bytes(quantity: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", quantity)
    assert m, quantity
    return int(m[1]) * units.get(m[2], 1)


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_redis_persists_every_acknowledged_write(target):
    """appendonly + appendfsync always on a PVC: an acknowledged EXEC is on disk."""
    objs = render(target)
    sts, _, c = _redis(objs)
    _, conf = _redis_conf(objs)
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "always"
    assert conf.get("no-appendfsync-on-rewrite", "no") == "no", "fsync also during rewrites"
    # The data dir is the pod's own RWO claim, kept when the pod or the set goes.
    assert sts["spec"]["replicas"] == 1
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == conf["dir"]]
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert templates[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_redis_never_evicts(target):
    """Every key is data (features, unacknowledged entries, lag counters): a full Redis
    must refuse writes, which clients see, never evict, which nobody sees."""
    objs = render(target)
    _, _, c = _redis(objs)
    _, conf = _redis_conf(objs)
    assert conf["maxmemory-policy"] == "noeviction"
    # maxmemory below the container's limit: Redis refuses writes before the kernel
    # OOM-kills it, with room left for the AOF rewrite's fork.
    limit = _k8s_bytes(c["resources"]["limits"]["memory"])
    assert 0 < _redis_bytes(conf["maxmemory"]) <= 0.75 * limit
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_redis_probes_and_service(target):
    objs = render(target)
    _, spec, c = _redis(objs)
    assert "redis-cli" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert "ping" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert "redis-cli" in " ".join(c["livenessProbe"]["exec"]["command"])
    assert c["startupProbe"]["tcpSocket"]["port"] == 6379
    assert {p["containerPort"] for p in c["ports"]} == {6379}
    svc = one(objs, "Service", "redis")
    assert [p["port"] for p in svc["spec"]["ports"]] == [6379]
    assert svc["spec"].get("clusterIP") != "None", "clients need one stable address"
    # /data and /tmp writable, the root read-only (checked for every container above).
    assert {"/data", "/tmp"} <= {m["mountPath"] for m in c["volumeMounts"]}
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]


def test_redis_conf_and_probes_run_on_a_real_redis_server(tmp_path):
    """redis-server 7.0 (the image's version) starts with the container's own command on the
    committed config, reports the settings above, refuses clients without the Secret's
    password, and the probes' own shell commands pass on it and fail without it."""
    import socket
    import subprocess
    import time

    server = shutil.which("redis-server")
    if server is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed")
    objs = render("overlays/cpu")
    text, conf = _redis_conf(objs)
    _, _, c = _redis(objs)
    conf_path = _redis_conf_path(c)
    # The container's environment, the Secret's value included (the probes' redis-cli reads
    # REDISCLI_AUTH from it, as the kubelet's exec probes do).
    password = "probe0test0password"
    env = {**os.environ, **expanded_env(c)}
    env = {k: (password if v == SECRET_VALUE else v) for k, v in env.items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = re.sub(r"^dir .*$", f"dir {tmp_path}", text, flags=re.M)
    local = re.sub(r"^port .*$", f"port {port}", local, flags=re.M)
    local = re.sub(r"^bind .*$", "bind 127.0.0.1", local, flags=re.M)
    (tmp_path / "redis.conf").write_text(local)

    def probe(name: str) -> int:
        cmd = [a.replace("-p 6379", f"-p {port}") for a in c[name]["exec"]["command"]]
        return subprocess.run(cmd, capture_output=True, timeout=10, env=env).returncode

    def cli(*args: str, auth: bool = True) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env if auth else {k: v for k, v in env.items() if k != "REDISCLI_AUTH"},
        )
        return (out.stdout + out.stderr).strip()

    # The container's own start script, on the local config (the password from stdin).
    script = _redis_script(c).replace(str(conf_path), str(tmp_path / "redis.conf"))
    script = script.replace("exec redis-server", f"exec {server}")
    proc = procs.spawn(["sh", "-c", script], stdout=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60  # a bound on a hang: redis answers when it is up
        while cli("ping") != "PONG":
            assert time.monotonic() < deadline, "redis-server never answered PING"
            time.sleep(0.05)
        # The password from the Secret is required: without it, every command is refused.
        assert "NOAUTH" in cli("set", "k", "v", auth=False)
        assert "NOAUTH" in cli("ping", auth=False)
        assert cli("config", "get", "appendfsync").split() == ["appendfsync", "always"]
        assert cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
        assert cli("config", "get", "maxmemory-policy").split()[1] == "noeviction"
        assert int(cli("config", "get", "maxmemory").split()[1]) == _redis_bytes(conf["maxmemory"])
        assert probe("readinessProbe") == 0 and probe("livenessProbe") == 0
        assert cli("set", "k", "v") == "OK"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert probe("readinessProbe") != 0 and probe("livenessProbe") != 0
    assert list((tmp_path / "appendonlydir").glob("*.aof")), "no append-only file written"


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
        # every replica the headless Service has when the job runs (serving.discovery)
        assert cfg.url == "dns:triton-headless:8001", f"{key}: url must be Triton's gRPC port"
        assert "triton-headless" in services
        if key == "evaluate.yaml":
            assert cfg.metrics_url == "dns:triton-headless:8002"
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


def _pod_labels(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "matchLabels only, so this test can read it"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOADS]


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_only_triton_the_consumers_and_control_jobs_reach_redis(target):
    objs = render(target)
    redis_labels = _pod_labels(one(objs, "StatefulSet", "redis"))
    policies = [
        o
        for o in objs
        if o["kind"] == "NetworkPolicy"
        and "Ingress" in o["spec"]["policyTypes"]
        and _selects(o["spec"]["podSelector"], redis_labels)
    ]
    assert {p["metadata"]["name"] for p in policies} == {"default-deny-ingress", "redis"}
    peers = []
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            assert {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]} == {(6379, "TCP")}
            assert rule.get("from"), f"{pol['metadata']['name']}: a rule open to everyone"
            for peer in rule["from"]:
                # Pods of this namespace only: no namespaceSelector, no ipBlock.
                assert set(peer) == {"podSelector"}, peer
                assert peer["podSelector"].get("matchLabels"), "an empty selector is every pod"
                peers.append(peer["podSelector"])
    workloads = _workloads(objs) + _workloads(render("bootstrap"))
    let_in = {_name(w) for w in workloads if any(_selects(sel, _pod_labels(w)) for sel in peers)}
    assert let_in == {
        "StatefulSet/triton",
        "StatefulSet/northstar-log-writer",
        "Deployment/northstar-features",
        "CronJob/northstar-retrain",
        "CronJob/northstar-canary-evaluate",
        "Job/northstar-bootstrap-export",
    }, sorted(let_in)
    # Everything that names redis:// in its env or args is let in.
    for w in workloads:
        text = yaml.safe_dump(pod_spec(w))
        if re.search(r"redis://(:[^@\s]*@)?redis:", text):
            assert _name(w) in let_in, f"{_name(w)} uses Redis but the policy keeps it out"
    # Triton's egress (it has an egress policy) reaches Redis on 6379, and DNS for the name.
    triton = one(objs, "NetworkPolicy", "triton")
    assert "Egress" in triton["spec"]["policyTypes"]
    to_redis = [
        r
        for r in triton["spec"]["egress"]
        for peer in r["to"]
        if "podSelector" in peer
        and "namespaceSelector" not in peer
        and _selects(peer["podSelector"], redis_labels)
    ]
    assert to_redis and {p["port"] for r in to_redis for p in r["ports"]} == {6379}
    dns = {
        (p["port"], p["protocol"])
        for r in triton["spec"]["egress"]
        for p in r["ports"]
        if p["port"] == 53
    }
    assert dns == {(53, "UDP"), (53, "TCP")}


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_each_overlay_serves_the_image_built_for_its_target(target):
    """Dockerfile --build-arg TARGET=cpu|gpu; the overlay's tag says which."""
    _, _, c = _triton(target)
    tag = c["image"].rsplit(":", 1)[1]
    assert tag.endswith("-" + target.rsplit("/", 1)[1]), c["image"]
    cronjob = one(render(target), "CronJob", "northstar-retrain")
    retrain_tag = pod_spec(cronjob)["containers"][0]["image"].rsplit(":", 1)[1]
    assert tag.startswith(retrain_tag + "-"), "serving and retrain images: one release"


def test_bootstrap_seeds_the_online_store_after_the_export():
    (job,) = [o for o in render("bootstrap") if o["kind"] == "Job"]
    (c,) = pod_spec(job)["containers"]
    cmds = [_parse_cli(argv) for argv in northstar_commands(c)]
    names = [(a.command, getattr(a, "online_command", None)) for a in cmds]
    assert names.index(("online", "seed")) > names.index(("export", None))
    (seed,) = [a for a in cmds if a.command == "online"]
    (export,) = [a for a in cmds if a.command == "export"]
    assert seed.run == export.run
    _assert_is_the_redis_service(render("overlays/cpu"), seed.url)


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


def test_adapter_rule_divides_triton_queue_time_by_requests():
    """nv_inference_queue_duration_us adds up every request's queue time: per request it is
    divided by requests, not by batch executions (which would scale it by the batch size)."""
    (rule,) = [r for r in _adapter_rules() if r["name"]["as"] == "triton_queue_ms_per_request"]
    query = " ".join(rule["metricsQuery"].split())
    used = set(re.findall(r"\b(nv_[a-z_]+)\b", query + rule["seriesQuery"]))
    assert used == {TRITON_QUEUE, TRITON_REQUESTS}, used
    assert TRITON_EXECS not in query
    # rate(queue µs) / (rate(requests) * 1000) = ms per request, over one minute; an idle
    # pod reads 0, not NaN (clamp_min), so the HPA always has a value.
    num, _, den = query.partition("by (<<.GroupBy>>) / (")
    assert f"rate({TRITON_QUEUE}{{<<.LabelMatchers>>}}[1m])" in num
    assert f"clamp_min(sum(rate({TRITON_REQUESTS}{{<<.LabelMatchers>>}}[1m]))" in den
    assert den.rstrip().endswith("* 1000)")
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


def test_readme_says_what_was_validated_and_how_to_start():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "kubectl apply -k deploy/overlays/cpu",
        "kubectl create secret generic northstar-admin-key",
        "/v2/health/ready",
        "s3://",
        "Redis",
        "northstar online seed",
        "northstar feedback lag",
        "appendfsync always",
        "noeviction",
        "--build-arg TARGET=cpu",
        "not run",
    ):
        assert needle in text, f"deploy/README.md lacks {needle!r}"
    dev = re.search(r"^dev = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert dev and '"kubernetes-validate==' in dev.group(1), "pin the schema checker in dev"


# ----------------------------------------------------------------------------- issue 32
# What kept the manifests from working on a real cluster: each test below fails on the
# manifests before the fix (deploy/README.md, "What was validated here").

OVERLAYS = ("overlays/cpu", "overlays/gpu")
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|localhost|::1|\[::1\])$")


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in `args` (the last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


@pytest.mark.parametrize("target", OVERLAYS)
def test_triton_metrics_listen_on_the_pod_address(target):
    """Triton binds its metrics to --http-address unless --metrics-address says otherwise;
    the HTTP address is loopback (the proxy sidecar fronts it), so without the flag
    pod-IP:8002 refuses Prometheus, and the HPA, the canary and 5 alerts read nothing."""
    _, _, c = _triton(target)
    args = [str(a) for a in c["args"]]
    http = _flag(args, "--http-address") or "0.0.0.0"
    address = _flag(args, "--metrics-address") or http
    assert not LOOPBACK.match(address), f"Triton's metrics listen on {address}: loopback"
    port = int(_flag(args, "--metrics-port") or 8002)
    assert port == {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]


def _services_selected(objs: list[dict], selector: dict) -> list[dict]:
    return [
        o
        for o in objs
        if o["kind"] == "Service" and _selects(selector, o["metadata"].get("labels", {}))
    ]


def _pods_of_service(objs: list[dict], svc: dict) -> list[dict]:
    sel = svc["spec"]["selector"]
    return [w for w in _workloads(objs) if sel.items() <= _pod_labels(w).items()]


def _container_ports(w: dict) -> dict:
    """name and number -> (container, port) over the workload's containers."""
    out = {}
    for c in pod_spec(w)["containers"]:
        for p in c.get("ports", []):
            out[p["containerPort"]] = (c, p)
            if "name" in p:
                out[p["name"]] = (c, p)
    return out


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_monitor_scrapes_a_port_that_exists(target):
    """Each ServiceMonitor endpoint names a port of the Services it selects, whose
    targetPort is a port of the selected pods; each PodMonitor endpoint a port of its pods."""
    objs = render(target)
    monitors = [o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert {_name(m) for m in monitors} == {
        "ServiceMonitor/triton",
        "ServiceMonitor/northstar-monitor",
        "PodMonitor/northstar-stream-consumers",
    }
    for m in monitors:
        where = _name(m)
        if m["kind"] == "ServiceMonitor":
            services = _services_selected(objs, m["spec"]["selector"])
            assert services, f"{where} selects no Service"
            for svc in services:
                ports = {p["name"]: p for p in svc["spec"]["ports"]}
                pods = _pods_of_service(objs, svc)
                assert pods, f"{where}: Service {svc['metadata']['name']} selects no pod"
                for ep in m["spec"]["endpoints"]:
                    assert ep["port"] in ports, f"{where}: {svc['metadata']['name']} has no {ep}"
                    target_port = ports[ep["port"]]["targetPort"]
                    for w in pods:
                        assert target_port in _container_ports(w), f"{where}: {_name(w)}"
        else:
            pods = [w for w in _workloads(objs) if _selects(m["spec"]["selector"], _pod_labels(w))]
            assert pods, f"{where} selects no pod"
            for ep in m["spec"]["podMetricsEndpoints"]:
                for w in pods:
                    assert ep["port"] in _container_ports(w), f"{where}: {_name(w)} has no {ep}"


def _monitoring_label() -> dict[str, str]:
    kz = yaml.safe_load((DEPLOY / "monitoring" / "kustomization.yaml").read_text())
    (entry,) = kz["labels"]
    return entry["pairs"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_monitoring_objects_carry_the_prometheus_selector_label(target):
    """kube-prometheus-stack's Prometheus selects ServiceMonitors, PodMonitors and rules by
    `release: <its release>`: every one of ours carries the label set in one place."""
    label = _monitoring_label()
    assert set(label) == {"release"}, label
    found = [o for o in render(target) if o["apiVersion"] == MONITORING_API]
    assert {o["kind"] for o in found} == MONITORING_KINDS
    for obj in found:
        assert label.items() <= obj["metadata"]["labels"].items(), _name(obj)
        assert obj["metadata"]["namespace"] == "northstar", _name(obj)
    readme = (DEPLOY / "README.md").read_text()
    assert f"release: {label['release']}" in readme, "say which selector label is set"


def test_the_alert_rules_are_part_of_the_kustomization():
    """diagnose/alerts.yaml is applied with the overlay (kustomize reads no file outside the
    folder: deploy/monitoring/alerts.yaml is its copy, kept equal here)."""
    source = ROOT / "diagnose" / "alerts.yaml"
    copy = DEPLOY / "monitoring" / "alerts.yaml"
    assert copy.read_text() == source.read_text(), (
        "deploy/monitoring/alerts.yaml differs from diagnose/alerts.yaml: "
        "cp diagnose/alerts.yaml deploy/monitoring/alerts.yaml"
    )
    want = yaml.safe_load(source.read_text())
    for target in OVERLAYS:
        rule = one(render(target), "PrometheusRule", want["metadata"]["name"])
        assert rule["spec"] == want["spec"], target
        dash = one(render(target), "ConfigMap", "northstar-grafana-dashboard")
        assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert (
            dash["data"]["grafana-dashboard.json"]
            == (DEPLOY / "monitoring" / "grafana-dashboard.json").read_text()
        )


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed")
    return path


def test_monitoring_objects_are_well_formed(tmp_path):
    """No schema for the operator's CRDs here: their required fields, and every rule file
    through `promtool check rules` (PromQL parses, durations, labels, templates)."""
    objs = render("overlays/cpu")
    for obj in (o for o in objs if o["apiVersion"] == MONITORING_API):
        spec = obj["spec"]
        if obj["kind"] == "ServiceMonitor":
            assert spec["selector"]["matchLabels"] and spec["endpoints"], _name(obj)
            assert all(set(ep) <= {"port", "path", "interval"} for ep in spec["endpoints"])
        elif obj["kind"] == "PodMonitor":
            assert spec["selector"]["matchLabels"] and spec["podMetricsEndpoints"], _name(obj)
        else:
            assert set(spec) == {"groups"}, _name(obj)
            path = tmp_path / f"{obj['metadata']['name']}.rules.yaml"
            path.write_text(yaml.safe_dump({"groups": spec["groups"]}))
            out = subprocess.run(
                [_promtool(), "check", "rules", str(path)], capture_output=True, text=True
            )
            assert out.returncode == 0, f"{_name(obj)}: {out.stdout}{out.stderr}"


def _scrape_jobs(objs: list[dict]) -> set[str]:
    """The job label the operator gives each monitor's targets: a ServiceMonitor's is the
    Service's name (no jobLabel set), a PodMonitor's is <namespace>/<name>."""
    jobs = set()
    for m in objs:
        if m["kind"] == "ServiceMonitor":
            assert "jobLabel" not in m["spec"]
            jobs |= {s["metadata"]["name"] for s in _services_selected(objs, m["spec"]["selector"])}
        elif m["kind"] == "PodMonitor":
            assert "jobLabel" not in m["spec"]
            jobs.add(f"{m['metadata']['namespace']}/{m['metadata']['name']}")
    return jobs


def _availability_rules() -> list[dict]:
    rule = one(render("overlays/cpu"), "PrometheusRule", "northstar-availability")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_every_scrape_job_has_an_up_and_an_absent_alert():
    """A total outage pages: for every job, `up == 0` (a target stops answering) and
    `absent(up{job=...})` (no target at all)."""
    jobs = _scrape_jobs(render("overlays/cpu"))
    assert jobs == {"triton-headless", "northstar-monitor", "northstar/northstar-stream-consumers"}
    exprs = [" ".join(r["expr"].split()) for r in _availability_rules()]
    for job in jobs:
        down = [
            e
            for e in exprs
            if e.endswith("== 0")
            and (
                f'up{{job="{job}"}}' in e
                or any(job in m.split("|") for m in re.findall(r'^up\{job=~"([^"]+)"\}', e))
            )
        ]
        assert down, f"no `up == 0` alert for job {job}"
        assert any(f'absent(up{{job="{job}"}})' in e for e in exprs), f"no absent() for {job}"


def test_the_availability_alerts_fire_under_promtool(tmp_path):
    """promtool's rule unit tests: a down Triton target fires NorthstarTargetDown, no
    monitor target at all fires NorthstarMonitorAbsent, consumers without lag series (Redis
    down) fire NorthstarStreamLagAbsent; with everything up and exporting, nothing fires."""
    rule = one(render("overlays/cpu"), "PrometheusRule", "northstar-availability")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    consumers = 'up{job="northstar/northstar-stream-consumers",instance="c:9100"}'
    lag = "northstar_stream_oldest_unacked_age_seconds"
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="triton-headless",instance="t0:8002"}', "values": "0x20"},
                    {"series": consumers, "values": "1x20"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "NorthstarTargetDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "job": "triton-headless",
                                    "instance": "t0:8002",
                                },
                                "exp_annotations": {
                                    "summary": "triton-headless target t0:8002 does not "
                                    "answer its scrape",
                                    "runbook": "deploy/README.md#monitoring",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "NorthstarMonitorAbsent",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "ticket", "job": "northstar-monitor"},
                                "exp_annotations": {
                                    "summary": "Prometheus scrapes no northstar monitor "
                                    "(job northstar-monitor)",
                                    "runbook": "deploy/README.md#monitoring",
                                },
                            }
                        ],
                    },
                    {"eval_time": "15m", "alertname": "NorthstarTritonAbsent", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "NorthstarStreamLagAbsent",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "page", "group": "log"},
                                "exp_annotations": {
                                    "summary": "no stream lag for a consumer group: is Redis "
                                    "answering?",
                                    "runbook": "deploy/README.md#monitoring",
                                },
                            },
                            {
                                "exp_labels": {"severity": "page", "group": "features"},
                                "exp_annotations": {
                                    "summary": "no stream lag for a consumer group: is Redis "
                                    "answering?",
                                    "runbook": "deploy/README.md#monitoring",
                                },
                            },
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="triton-headless",instance="t0:8002"}', "values": "1x20"},
                    {"series": 'up{job="northstar-monitor",instance="m:9109"}', "values": "1x20"},
                    {"series": consumers, "values": "1x20"},
                    {"series": f'{lag}{{group="log",partition="0"}}', "values": "0x20"},
                    {"series": f'{lag}{{group="features",partition="0"}}', "values": "0x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": r["alert"], "exp_alerts": []}
                    for r in _availability_rules()
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    out = subprocess.run(
        [_promtool(), "test", "rules", "tests.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_monitor_runs_as_a_deployment_behind_the_service_the_alerts_link():
    """`northstar monitor` (5 rules, 8 panels read it): a Deployment whose command this
    CLI accepts, listening on the pod's address, behind the Service the alerts' report
    links name, reading the labels the join writes, reachable from Prometheus."""
    objs = render("overlays/cpu")
    dep = one(objs, "Deployment", "northstar-monitor")
    (c,) = pod_spec(dep)["containers"]
    (argv,) = northstar_commands(c)
    args = _parse_cli(argv)
    assert args.command == "monitor"
    assert not LOOPBACK.match(args.host), f"monitor listens on {args.host}"
    assert args.port == _container_ports(dep)["metrics"][1]["containerPort"]
    # Labels: the join's output.
    joins = [
        _parse_cli(a)
        for _, _, jc in containers(objs)
        for a in northstar_commands(jc)
        if a[:2] == ["feedback", "join"]
    ]
    assert args.labels == joins[0].out
    # Every `report` link of the alert rules reaches this pod through a Service port.
    alerts = yaml.safe_load((ROOT / "diagnose" / "alerts.yaml").read_text())
    links = {
        r["annotations"]["report"]
        for g in alerts["spec"]["groups"]
        for r in g["rules"]
        if "report" in r.get("annotations", {})
    }
    assert links
    for link in links:
        m = re.match(r"http://([^:/]+):(\d+)/", link)
        assert m, link
        svc = one(objs, "Service", m[1])
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(m[2])]
        assert _pods_of_service(objs, svc) == [dep]
        assert _container_ports(dep)[port["targetPort"]][1]["containerPort"] == args.port
    # Prometheus (and Alertmanager's webhook) may reach it.
    pol = one(objs, "NetworkPolicy", "northstar-monitor")
    assert _selects(pol["spec"]["podSelector"], _pod_labels(dep))
    assert {p["port"] for r in pol["spec"]["ingress"] for p in r["ports"]} == {args.port}


def _check_module():
    """deploy/check.py, the script operators run before applying."""
    import importlib.util
    import sys

    if "_deploy_check" in sys.modules:
        return sys.modules["_deploy_check"]
    spec = importlib.util.spec_from_file_location("_deploy_check", DEPLOY / "check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _storage_classes(target: str) -> dict[str, str]:
    cm = yaml.safe_load((DEPLOY / target / "storage-classes.yaml").read_text())
    return cm["data"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_claim_has_the_overlays_storage_class(target):
    """RWX claims (model repository, canary state) get the overlay's `shared` class, RWO
    claims (Redis's AOF, the SQLite log, MLflow's artifacts) its `local` one; the values
    come from the overlay's storage-classes.yaml, which is not applied itself."""
    check = _check_module()
    classes = _storage_classes(target)
    assert set(classes) == {"shared", "local"}
    objs = render(target)
    assert not [o for o in objs if o["metadata"]["name"] == "storage-classes"]
    found = check.claims(objs)
    assert {c.where for c in found} >= {
        "PersistentVolumeClaim/model-repository",
        "PersistentVolumeClaim/canary-state",
        "StatefulSet/redis volumeClaimTemplates[data]",
        "StatefulSet/northstar-log-writer volumeClaimTemplates[events]",
    }
    for claim in found:
        (mode,) = claim.modes
        want = classes["shared"] if mode == "ReadWriteMany" else classes["local"]
        assert claim.storage_class == want, claim
    assert check.check_storage(objs) == []


def _overlay_with_classes(tmp_path: Path, shared: str, local: str) -> list[dict]:
    """An operator's overlay: the base with its own storage-classes.yaml."""
    import os.path

    cm = yaml.safe_load((DEPLOY / "overlays/cpu/storage-classes.yaml").read_text())
    cm["data"] = {"shared": shared, "local": local}
    (tmp_path / "storage-classes.yaml").write_text(yaml.safe_dump(cm))
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [f"{rel}/base", "storage-classes.yaml"],
                "components": [f"{rel}/components/storage-classes", f"{rel}/components/images"],
            }
        )
    )
    out = subprocess.run(
        [_kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _sc(name: str, provisioner: str, **params: str) -> dict:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": provisioner,
        "parameters": params,
    }


def test_an_nfs_class_for_redis_and_the_sqlite_log_is_refused(tmp_path):
    check = _check_module()
    objs = _overlay_with_classes(tmp_path, shared="nfs-client", local="nfs-client")
    refused = check.check_storage(objs)
    assert len(refused) == 3, refused  # Redis, the log, MLflow's artifacts; not the RWX ones
    (redis,) = [e for e in refused if e.startswith("StatefulSet/redis ")]
    assert "network filesystem" in redis and "append-only file" in redis
    (log,) = [e for e in refused if e.startswith("StatefulSet/northstar-log-writer ")]
    assert "SQLite" in log and "local block storage" in log
    # The cluster's classes decide when given: a harmless name on an NFS provisioner...
    objs = render("overlays/cpu")
    classes = {
        "northstar-shared": _sc("northstar-shared", "efs.csi.aws.com"),
        "northstar-local-ssd": _sc("northstar-local-ssd", "nfs.csi.k8s.io"),
    }
    assert len(check.check_storage(objs, classes)) == 3
    # ... a block class for ReadWriteMany, which would stay Pending ...
    classes["northstar-local-ssd"] = _sc("northstar-local-ssd", "ebs.csi.aws.com", type="gp3")
    assert check.check_storage(objs, classes) == []
    classes["northstar-shared"] = _sc("northstar-shared", "pd.csi.storage.gke.io")
    refused = check.check_storage(objs, classes)
    assert len(refused) == 2 and all("cannot give ReadWriteMany" in e for e in refused)
    # ... and a class the cluster does not have.
    del classes["northstar-shared"]
    assert any("does not exist" in e for e in check.check_storage(objs, classes))
    # A claim without a class (the manifests before the component) is refused too.
    bare = [
        {**o, "spec": {k: v for k, v in o["spec"].items() if k != "storageClassName"}}
        if o["kind"] == "PersistentVolumeClaim"
        else o
        for o in objs
    ]
    assert any("no storageClassName" in e for e in check.check_storage(bare))


def test_the_check_command_refuses_with_a_clear_message(tmp_path):
    """What an operator runs: `python deploy/check.py OVERLAY --storage-classes FILE`."""
    import sys

    classes = [
        _sc("northstar-shared", "filestore.csi.storage.gke.io"),
        _sc("northstar-local-ssd", "nfs.csi.k8s.io"),
    ]
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump_all(classes))
    cmd = [sys.executable, str(DEPLOY / "check.py"), str(DEPLOY / "overlays/cpu")]
    out = subprocess.run(
        [*cmd, "--storage-classes", str(path), "--allow-placeholder-images"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "refused: StatefulSet/redis volumeClaimTemplates[data]: storage class " in out.stderr
    assert "nfs.csi.k8s.io" in out.stderr
    # The placeholder registry is refused until an operator sets theirs.
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "registry.example.com" in out.stderr
    path.write_text(
        yaml.safe_dump_all(
            [classes[0], _sc("northstar-local-ssd", "pd.csi.storage.gke.io", type="pd-ssd")]
        )
    )
    out = subprocess.run(
        [*cmd, "--storage-classes", str(path), "--allow-placeholder-images"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def test_gpu_pods_schedule_on_the_gpu_request_alone():
    """No nodeSelector on a GPU Feature Discovery label (nvidia.com/gpu.present): pods would
    stay Pending on clusters without the GPU Operator. The device plugin's resource suffices."""
    _, spec, c = _triton("overlays/gpu")
    assert not spec.get("nodeSelector"), spec.get("nodeSelector")
    assert not spec.get("affinity")
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("target", OVERLAYS)
def test_routing_switches_go_through_the_redis_record(target, tmp_path, monkeypatch):
    """Every process that switches or serves routing has the store: the CronJobs (canary
    start, promote, rollback), the bootstrap's export, and Triton. serving.routing then
    writes the record, which replicas read each second, instead of routing.json on NFS."""
    from serving.routing import routing_store_of

    objs = render(target)
    movers = [
        one(objs, "CronJob", "northstar-retrain"),
        one(objs, "CronJob", "northstar-canary-evaluate"),
        one(objs, "StatefulSet", "triton"),
        *[o for o in render("bootstrap") if o["kind"] == "Job"],
    ]
    for w in movers:
        (c,) = [c for c in pod_spec(w)["containers"] if c["name"] != "proxy"]
        url = expanded_env(c).get("NORTHSTAR_ONLINE_STORE")
        assert url, f"{_name(w)}: no NORTHSTAR_ONLINE_STORE: switches would write routing.json"
        _assert_is_the_redis_service(objs, url)
        monkeypatch.setenv("NORTHSTAR_ONLINE_STORE", url)
        assert routing_store_of(tmp_path) == (url, "northstar"), _name(w)


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_hpa_owns_triton_scale(target):
    """`replicas` on the StatefulSet would reset the HPA's scale on every apply."""
    objs = render(target)
    sts = one(objs, "StatefulSet", "triton")
    assert "replicas" not in sts["spec"]
    hpa = one(objs, "HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"


def test_grpc_clients_resolve_every_ready_replica():
    """An L4 ClusterIP pins a gRPC channel's one connection to one replica: clients resolve a
    headless Service (dns:///) and balance calls with round_robin; only ready pods listed."""
    objs = render("overlays/cpu")
    svc = one(objs, "Service", "triton-grpc")
    assert svc["spec"]["clusterIP"] == "None"
    assert not svc["spec"].get("publishNotReadyAddresses")
    ((port),) = svc["spec"]["ports"]
    assert port["port"] == 8001
    (pod,) = _pods_of_service(objs, svc)
    container, _ = _container_ports(pod)[port["targetPort"]]
    assert container["name"] == "proxy", "through the body-bounding proxy"
    readme = (DEPLOY / "README.md").read_text()
    assert "dns:///triton-grpc.northstar.svc.cluster.local:8001" in readme
    assert "round_robin" in readme


def test_onnxruntime_threads_follow_the_pods_cpu_limit():
    """onnxruntime's default is a thread per core of the node, not of the pod's CPU limit:
    the first export writes the Triton container's limit into the repository's configs
    (retrains keep them), split between recommend's instances."""
    from common import config as config_mod
    from serving.publish import ExportConfig

    _, _, triton = _triton("overlays/cpu")
    limit = int(triton["resources"]["limits"]["cpu"])
    (job,) = [o for o in render("bootstrap") if o["kind"] == "Job"]
    (c,) = pod_spec(job)["containers"]
    (export,) = [_parse_cli(a) for a in northstar_commands(c) if a[0] == "export"]
    cfg = config_mod.load(ExportConfig, None, [f"run={export.run}", *export.set])
    assert cfg.serving_configs == "keep", "scheduled retrains keep the configured threads"
    assert cfg.retrieval.intra_op_threads == limit
    assert cfg.recommend.retrieval_threads * cfg.recommend.instances == limit
    assert cfg.recommend.solo_threads == limit


def _needs(objs: list[dict], w: dict) -> set[tuple[str, int]]:
    """(destination app, port) a workload calls, from what its manifest says it does."""
    text = yaml.safe_dump(pod_spec(w))
    out = set()
    if re.search(r"redis://(:[^@\s]*@)?redis:", text):
        out.add(("redis", 6379))
    if _pod_labels(w).get("northstar.io/role") == "control" and w["kind"] == "CronJob":
        out |= {("triton", 8001), ("triton", 8002), ("mlflow", 5000)}
    return out


def _egress_allows(policies: list[dict], labels: dict, dest: dict, port: int) -> bool:
    for pol in policies:
        if "Egress" not in pol["spec"]["policyTypes"]:
            continue
        if not _selects(pol["spec"]["podSelector"], labels):
            continue
        for rule in pol["spec"].get("egress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            peers = rule.get("to")
            if not peers:
                return True
            for peer in peers:
                if set(peer) == {"podSelector"} and _selects(peer["podSelector"], dest):
                    return True
    return False


@pytest.mark.parametrize("target", OVERLAYS)
def test_egress_is_denied_by_default_then_allowed_per_pod(target):
    """The CronJobs hold the admin key: no pod calls out unless a policy allows that call.
    Every call the manifests make is allowed, DNS for everyone, and the one rule without a
    destination (MLflow's managed PostgreSQL) is bound to its port."""
    objs = render(target)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = one(objs, "NetworkPolicy", "default-deny-egress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Egress"]}
    apps = {
        name: _pod_labels(one(objs, kind, name))
        for kind, name in (
            ("StatefulSet", "redis"),
            ("StatefulSet", "triton"),
            ("Deployment", "mlflow"),
        )
    }
    kube_dns = {"k8s-app": "kube-dns"}
    workloads = _workloads(objs) + _workloads(render("bootstrap"))
    for w in workloads:
        labels = _pod_labels(w)
        dns = [
            r
            for p in policies
            if "Egress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)
            for r in p["spec"].get("egress", [])
            for peer in r.get("to", [])
            if _selects(peer.get("podSelector", {}), kube_dns)
            and {(x["port"], x["protocol"]) for x in r["ports"]} == {(53, "UDP"), (53, "TCP")}
        ]
        assert dns, f"{_name(w)}: no DNS"
        for app, port in _needs(objs, w):
            assert _egress_allows(policies, labels, apps[app], port), f"{_name(w)} -> {app}:{port}"
    for pol in policies:
        for rule in pol["spec"].get("egress", []):
            if not rule.get("to"):
                assert [p["port"] for p in rule["ports"]] == [5432], pol["metadata"]["name"]
    # The bootstrap (a control pod) reaches Redis to seed it.
    (job,) = [o for o in render("bootstrap") if o["kind"] == "Job"]
    assert _egress_allows(policies, _pod_labels(job), apps["redis"], 6379)


def _redis_urls(c: dict) -> list[str]:
    env = expanded_env(c)
    values = list(env.values()) + (expanded_args(c) if "args" in c else [])
    return [u for v in values for u in re.findall(r"redis://\S+", v)]


@pytest.mark.parametrize("target", TARGETS)
def test_the_redis_password_reaches_every_client_from_one_secret(target):
    """Redis requires the Secret's password; every client's URL carries that Secret's value
    through the environment, never a literal."""
    objs = render(target)
    redis_objs = render("overlays/cpu") if target == "bootstrap" else objs
    _, _, server = _redis(redis_objs)
    ref = secret_vars(server)["REDIS_PASSWORD"]
    assert secret_vars(server)["REDISCLI_AUTH"] == ref, "the probes authenticate"
    assert "requirepass $REDIS_PASSWORD" in _redis_script(server)
    clients = 0
    for obj, _, c in containers(objs):
        if c["name"] == "redis":
            continue
        for url in _redis_urls(c):
            m = REDIS_URL.match(url.split("?")[0])
            assert m and m["password"] == SECRET_VALUE, f"{_name(obj)}/{c['name']}: {url}"
            assert secret_vars(c)["REDIS_PASSWORD"] == ref, f"{_name(obj)}/{c['name']}"
            clients += 1
    assert clients


def test_image_names_come_from_one_images_list():
    """One `images:` list (deploy/components/images) names every image's registry and tag."""
    with_images = [
        p.relative_to(DEPLOY)
        for p in DEPLOY.rglob("kustomization.yaml")
        if "images" in (yaml.safe_load(p.read_text()) or {})
    ]
    assert with_images == [Path("components/images/kustomization.yaml")], with_images
    entries = yaml.safe_load((DEPLOY / with_images[0]).read_text())["images"]
    mapped = {f"{e['newName']}:{e['newTag']}" for e in entries}
    for target in TARGETS:
        for obj, _, c in containers(render(target)):
            assert c["image"] in mapped, f"{_name(obj)}/{c['name']}: {c['image']} not mapped"


def test_readme_states_the_kubernetes_version_and_the_checks():
    text = (DEPLOY / "README.md").read_text()
    assert f"Kubernetes {KUBERNETES_MIN_VERSION} or later" in text
    for needle in ("python deploy/check.py", "storage-classes.yaml", "northstar-redis"):
        assert needle in text, f"deploy/README.md lacks {needle!r}"
