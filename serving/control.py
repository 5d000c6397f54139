"""What a live Triton serves, changed in one place.

Triton runs in explicit model-control mode: after start it loads only what this
module asks for. Every change of what users are served (export's promote, a canary
start, a promote, a rollback) goes through `switch_routing`, in the one safe order:

1. load every version the new routing needs, keeping the ones the current routing
   still sends users to (in-flight requests must not lose their version);
2. only then write routing.json: `recommend` re-reads it within a second;
3. persist config.pbtxt with just the new routing's versions, for the next restart;
4. optionally, after a drain, unload the versions nobody is routed to any more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from serving import auth
from serving import repository as layout
from serving.routing import RoutingState

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """tritonserver failed to start or to load something; the message carries its log tail."""


def _grpc(url: str):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


def load_model(url: str, name: str, *, config=None) -> None:
    """(Re)load `name`; with `config` (a ModelConfig) it overrides config.pbtxt for this load.

    A failed reload leaves the model as it was: Triton keeps serving the old versions.
    """
    from tritonclient.utils import InferenceServerException

    client = _grpc(url)
    try:
        client.load_model(
            name,
            config=None if config is None else layout.to_json(config),
            headers=auth.headers(),
        )
    except InferenceServerException as exc:
        raise ServerError(f"loading {name!r} failed: {exc.message()}") from exc
    finally:
        client.close()


def unload_model(url: str, name: str) -> None:
    client = _grpc(url)
    try:
        client.unload_model(name, headers=auth.headers())
    finally:
        client.close()


def version_states(url: str, name: str = layout.RETRIEVAL) -> dict[int, str]:
    """Version -> state (READY, LOADING, UNLOADING, UNAVAILABLE) from the repository index."""
    client = _grpc(url)
    try:
        index = client.get_model_repository_index(headers=auth.headers(), as_json=True)
        index = index.get("models", [])
    finally:
        client.close()
    return {
        int(m["version"]): m.get("state", "")
        for m in index
        if m.get("name") == name and m.get("version")
    }


def ready_versions(url: str, name: str = layout.RETRIEVAL) -> list[int]:
    """Versions of `name` Triton reports READY (repository index)."""
    return sorted(v for v, s in version_states(url, name).items() if s == "READY")


def _wait_unloaded(url: str, timeout_s: float = 60.0) -> None:
    # While a version is UNLOADING, strict readiness answers "not ready": wait it out, so a
    # routing change hands back a ready server (bounded; a stuck unload is only logged).
    deadline = time.monotonic() + timeout_s
    while "UNLOADING" in version_states(url).values():
        if time.monotonic() > deadline:
            log.warning("retrieval versions still unloading after %.0f s", timeout_s)
            return
        time.sleep(0.1)


def load_versions(url: str, repo: str | Path, versions: Iterable[int], *, base_config=None) -> None:
    """Serve exactly `versions` of `retrieval` (version_policy: specific), all or nothing.

    The config override only changes the version set; if any version fails to load
    (a corrupt model.onnx, say) the call raises and the previous set keeps serving.
    """
    versions = sorted({int(v) for v in versions})
    for v in versions:
        if why := layout.incomplete_reasons(repo, v):
            raise ServerError(
                f"retrieval version {v} is incomplete (a half-finished export?): "
                f"{'; '.join(why)}; nothing was loaded"
            )
    # Triton keeps a version it refused as UNAVAILABLE until it restarts, and with strict
    # readiness that makes the whole server "not ready" (a container health check would
    # kill it for a refused canary). So a version Triton does not serve yet is opened here
    # first: a torn or corrupt graph is refused before Triton ever sees it.
    for v in sorted(set(versions) - set(ready_versions(url))):
        check_graph(repo, v)
    base = base_config or layout.read_config(Path(repo) / layout.RETRIEVAL / layout.CONFIG_FILE)
    load_model(url, layout.RETRIEVAL, config=layout.with_versions(base, versions))
    _wait_unloaded(url)
    missing = set(versions) - set(ready_versions(url))
    if missing:
        raise ServerError(f"retrieval versions {sorted(missing)} are not ready after loading")


def check_graph(repo: str | Path, version: int) -> None:
    """Open the version's model.onnx in onnxruntime on the CPU, or raise ServerError naming
    the file: what Triton's load would do, without leaving a refused version behind."""
    from models.onnx_session import onnx_session

    path = layout.version_dir(repo, version) / layout.ONNX_FILE
    try:
        onnx_session(path)
    except Exception as exc:  # onnxruntime raises its own types for a bad graph
        raise ServerError(
            f"retrieval version {version}: {path} does not load ({type(exc).__name__}: "
            f"{str(exc)[:300]}); nothing was loaded, the served versions are unchanged"
        ) from exc


def switch_routing(
    repo: str | Path,
    new: RoutingState,
    *,
    url: str | None = None,
    base_config=None,
    drain_s: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Serve `new`: the one way routing.json and the served version set change.

    `base_config` is the retrieval ModelConfig whose version list is replaced (default:
    the repository's config.pbtxt). Without `url` only the files change (a restart
    serves them). With `url` and `drain_s`, the versions `new` no longer names are
    unloaded after `drain_s` seconds, once `recommend` has re-read the routing.
    `progress` is told "load" and then "route", so a caller can say which one failed.
    """
    progress = progress or (lambda _phase: None)
    progress("load")
    repo = Path(repo)
    path = layout.routing_path(repo)
    current = RoutingState.load(path) if path.exists() else None
    check_shared_dims(repo, new)
    base = base_config or layout.read_config(repo / layout.RETRIEVAL / layout.CONFIG_FILE)
    if url:
        keep = set(new.versions) | set(current.versions if current else ())
        load_versions(url, repo, keep, base_config=base)
    progress("route")
    new.save(path)
    layout.write_config(repo, layout.with_versions(base, new.versions))
    if url and drain_s is not None:
        time.sleep(drain_s)
        load_versions(url, repo, new.versions, base_config=base)


def check_shared_dims(repo: str | Path, routing: RoutingState) -> layout.RetrievalDims:
    """Versions served side by side share one config.pbtxt, so they must share I/O dims."""
    dims = {v: layout.RetrievalDims.from_meta(layout.read_meta(repo, v)) for v in routing.versions}
    prod = dims[routing.production]
    for v, d in dims.items():
        if d != prod:
            raise ValueError(
                f"retrieval version {v} has dims {d} but production {routing.production} has "
                f"{prod}; versions served side by side share one config.pbtxt, so they must "
                "share history length, category count and K"
            )
    return prod


def routing_config(
    repo: Path,
    routing: RoutingState,
    target: str,
    serving: layout.RetrievalServing,
    *,
    keep_existing: bool = False,
):
    """The retrieval config serving `routing.versions`; they must share I/O dims.

    With `keep_existing`, the repository's config.pbtxt is reused with the new version
    list when it is for the same target and dims (its other settings may be tuned).
    """
    prod = check_shared_dims(repo, routing)
    metas = {v: layout.read_meta(repo, v) for v in routing.versions}
    path = repo / layout.RETRIEVAL / layout.CONFIG_FILE
    if keep_existing and path.exists():
        current = layout.read_config(path)
        if layout.config_target(current) == target and layout.config_dims(current) == prod:
            return layout.with_versions(current, routing.versions)
        log.info("%s is for another target or dims: writing a fresh one", path)
    n_items = max(int(m["bounds"]["n_items"]) for m in metas.values())
    return layout.retrieval_config(
        prod, target=target, versions=routing.versions, serving=serving, n_items=n_items
    )
