"""What a live Triton serves, changed in one place.

Triton runs in explicit model-control mode: after start it loads only what this
module asks for. Every change of what users are served (export's promote, a canary
start, a promote, a rollback) goes through `switch_routing`, in the one safe order:

1. load every version the new routing needs, keeping the ones the current routing
   still sends users to (in-flight requests must not lose their version);
2. only then write routing.json: `recommend` re-reads it within a second;
3. persist config.pbtxt with just the new routing's versions, for the next restart;
4. optionally, after a drain, unload the versions nobody is routed to any more.

Several replicas (`tritonserver`s on one model repository, a shared volume) are switched
together: `switch_routing(..., urls=[a, b])` (or `url="a,b"`, or `url="dns:NAME:PORT"` for
every address a headless Service has now, as under an autoscaler) first asks every replica
whether it answers, then loads on each; any replica down or refusing stops the switch with
an error naming it, before routing moves (versions already loaded on the others stay loaded
and unrouted: harmless, and the next switch's drain unloads them). Only then is routing
written, and only after the drain, on every replica, are the versions no routing names any
more unloaded.

Where routing is written: with an online store (explicit `store=`, $NORTHSTAR_ONLINE_STORE,
or the repository's routing_store.json that `northstar serve --online-store` writes) the
store's record is the truth, written by compare-and-set on its epoch with an instant a
little ahead (serving.routing.SWITCH_DELAY_S) at which every replica switches together;
routing.json is then mirrored from it for people and for servers without the store.
Without a store, routing.json is the truth (one host).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from common.redact import redacted
from models.onnx_session import onnx_session
from online.routing_store import RoutingStore
from serving import auth
from serving import repository as layout
from serving.discovery import split_urls
from serving.routing import SWITCH_DELAY_S, RoutingState, routing_of, routing_store_of, unservable

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """tritonserver failed to start or to load something; the message carries its log tail."""


class ReplicaError(ServerError):
    """One replica of several is down or refused a load: the switch stopped before routing
    moved. `replica` is its URL."""

    def __init__(self, replica: str, message: str):
        self.replica = replica
        super().__init__(message)


# The replicas' gRPC addresses: one, "a,b", a list, or dns:NAME:PORT (serving.discovery).
replica_urls = split_urls


def _grpc(url: str):
    return grpcclient.InferenceServerClient(url)


def load_model(url: str, name: str, *, config=None) -> None:
    """(Re)load `name`; with `config` (a ModelConfig) it overrides config.pbtxt for this load.

    A failed reload leaves the model as it was: Triton keeps serving the old versions.
    """
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


def version_states(
    url: str, name: str = layout.RETRIEVAL, *, timeout_s: float | None = None
) -> dict[int, str]:
    """Version -> state (READY, LOADING, UNLOADING, UNAVAILABLE) from the repository index."""
    client = _grpc(url)
    try:
        index = client.get_model_repository_index(
            headers=auth.headers(), as_json=True, client_timeout=timeout_s
        )
        index = index.get("models", [])
    finally:
        client.close()
    return {
        int(m["version"]): m.get("state", "")
        for m in index
        if m.get("name") == name and m.get("version")
    }


def ready_versions(
    url: str, name: str = layout.RETRIEVAL, *, timeout_s: float | None = None
) -> list[int]:
    """Versions of `name` Triton reports READY (repository index)."""
    return sorted(
        v for v, s in version_states(url, name, timeout_s=timeout_s).items() if s == "READY"
    )


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
    path = layout.version_dir(repo, version) / layout.ONNX_FILE
    try:
        onnx_session(path)
    except Exception as exc:  # onnxruntime raises its own types for a bad graph
        raise ServerError(
            f"retrieval version {version}: {path} does not load ({type(exc).__name__}: "
            f"{str(exc)[:300]}); nothing was loaded, the served versions are unchanged"
        ) from exc


@dataclass
class Switch:
    """What `switch_routing` did."""

    routing: RoutingState
    replicas: list[str]
    epoch: int = 0  # the store's epoch written; 0: routing.json only (no store)
    effective_at: float | None = None  # wall-clock instant every replica switches (store)
    unloaded: bool = False  # the drain ran and versions no longer routed were unloaded
    # replica -> why unloading failed there (routing had already moved: logged, not raised)
    unload_errors: dict[str, str] = field(default_factory=dict)


def switch_routing(
    repo: str | Path,
    new: RoutingState,
    *,
    url: str | Sequence[str] | None = None,
    urls: Iterable[str] | None = None,
    store: str | None = None,
    base_config=None,
    drain_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    delay_s: float = SWITCH_DELAY_S,
) -> Switch:
    """Serve `new`: the one way routing and the served version set change.

    `url`/`urls`: the replicas' gRPC addresses (`url` may be "a,b"). `store`: the online
    store's URL when routing lives there (default: $NORTHSTAR_ONLINE_STORE, else the
    repository's routing_store.json; neither: routing.json). `base_config` is the retrieval
    ModelConfig whose version list is replaced (default: the repository's config.pbtxt).
    Without replicas only the routing and files change (a restart serves them). With
    replicas and `drain_s`, the versions no longer routed are unloaded on every replica
    `drain_s` seconds after the switch took effect. `progress` is told "load" and then
    "route", so a caller can say which one failed. `delay_s`: how far ahead of Redis's clock
    the store's record takes effect (keep it above the replicas' re-read interval).
    """
    progress = progress or (lambda _phase: None)
    progress("load")
    repo = Path(repo)
    # Routing is an input like any other: a version that is not published whole here (a
    # typo, a torn export) is refused before anything is loaded or written, with or
    # without replicas to ask. Without this, a switch with no URL wrote a routing the
    # running server could not serve, and the next start refused it.
    if why := unservable(repo, new):
        raise ServerError(f"routing {new.to_dict()} refused: {'; '.join(why)}; nothing changed")
    replicas = replica_urls(url, urls)
    where = routing_store_of(repo, store)
    if where is not None:
        return _switch_in_store(repo, new, replicas, where, base_config, drain_s, progress, delay_s)
    path = layout.routing_path(repo)
    current = RoutingState.load(path) if path.exists() else None
    check_shared_dims(repo, new)
    base = base_config or layout.read_config(repo / layout.RETRIEVAL / layout.CONFIG_FILE)
    keep = set(new.versions) | set(current.versions if current else ())
    _load_everywhere(replicas, repo, keep, base, "routing.json is unchanged")
    progress("route")
    new.save(path)
    layout.write_config(repo, layout.with_versions(base, new.versions))
    done = Switch(new, replicas)
    if replicas and drain_s is not None:
        time.sleep(drain_s)
        _unload_everywhere(done, repo, set(new.versions), base)
    return done


def _switch_in_store(repo, new, replicas, where, base_config, drain_s, progress, delay_s):
    url, prefix = where
    rs = RoutingStore.from_url(url, prefix=prefix)
    try:
        rec = _settled_record(rs, repo)
        current = routing_of(rec.current, rs.key) if rec is not None else None
        check_shared_dims(repo, new)
        base = base_config or layout.read_config(repo / layout.RETRIEVAL / layout.CONFIG_FILE)
        keep = set(new.versions) | set(current.versions if current else ())
        epoch = rec.epoch if rec is not None else 0
        _load_everywhere(
            replicas, repo, keep, base, f"routing stays at epoch {epoch} ({redacted(url)})"
        )
        progress("route")
        # Compare-and-set: refused (StaleEpochError) if another controller wrote meanwhile.
        written = rs.write(new.to_dict(), expect_epoch=epoch, delay_s=delay_s)
        log.info(
            "routing epoch %d in %s: %s from %.3f",
            written.epoch,
            redacted(url),
            new,
            written.effective_at,
        )
        # The mirror, for people and for servers without the store; then the next restart's
        # version list.
        new.save(layout.routing_path(repo))
        layout.write_config(repo, layout.with_versions(base, new.versions))
        done = Switch(new, replicas, epoch=written.epoch, effective_at=written.effective_at)
        if replicas and drain_s is not None:
            # Every replica switches at effective_at; requests begun just before it finish
            # on the old version within the drain.
            time.sleep(max(0.0, written.effective_at - time.time()) + drain_s)
            latest = rs.read()
            if latest is None or latest.epoch != written.epoch:
                log.warning(
                    "routing moved past epoch %d during the drain: its switch unloads",
                    written.epoch,
                )
            else:
                _unload_everywhere(done, repo, set(new.versions), base)
        return done
    finally:
        rs.close()


def _settled_record(rs, repo: Path, bound_s: float = 60.0):
    """The store's record once no switch is pending (one switch at a time); created from
    routing.json when the store has none yet."""
    rec = rs.read()
    if rec is None:
        path = layout.routing_path(repo)
        if not path.exists():
            return None
        rec = rs.initialize(RoutingState.load(path).to_dict())
        log.info(
            "routing record created in %s from %s (epoch %d)", redacted(rs.url), path, rec.epoch
        )
    deadline = time.monotonic() + bound_s
    while rec is not None and rec.pending(time.time()):
        if time.monotonic() > deadline:
            raise ServerError(f"routing epoch {rec.epoch} still pending after {bound_s:.0f} s")
        time.sleep(min(0.5, max(0.01, rec.effective_at - time.time() + 0.01)))
        rec = rs.read()
    return rec


def _load_everywhere(replicas: list[str], repo: Path, keep: set[int], base, unchanged: str):
    """Every replica answers, then every replica serves `keep`; else ReplicaError naming
    the replica, before routing moves."""
    for r in replicas:  # all of them answer before anything is loaded anywhere
        try:
            ready_versions(r, timeout_s=10.0)
        except InferenceServerException as exc:
            raise ReplicaError(
                r,
                f"replica {r} does not answer ({exc.message()}); nothing was loaded or "
                f"switched: {unchanged}. Bring it back (or leave it out of the replicas) "
                "and switch again",
            ) from exc
    loaded: list[str] = []
    for r in replicas:
        try:
            load_versions(r, repo, keep, base_config=base)
        except (ServerError, InferenceServerException) as exc:
            why = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
            left = (
                f"; versions {sorted(keep)} stay loaded and unrouted on {', '.join(loaded)} "
                "(harmless: the next switch's drain unloads them)"
                if loaded
                else ""
            )
            raise ReplicaError(
                r, f"replica {r}: loading {sorted(keep)} failed ({why}); {unchanged}{left}"
            ) from exc
        loaded.append(r)


def _unload_everywhere(done: Switch, repo: Path, keep: set[int], base) -> None:
    """After the drain: every replica serves only `keep`. Routing has moved already, so a
    replica that fails here is logged and reported in `done.unload_errors`, not raised."""
    for r in done.replicas:
        try:
            load_versions(r, repo, keep, base_config=base)
        except (ServerError, InferenceServerException) as exc:
            why = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
            done.unload_errors[r] = why
            log.warning("replica %s: unloading versions no longer routed failed: %s", r, why)
    done.unloaded = not done.unload_errors


def check_shared_dims(repo: str | Path, routing: RoutingState) -> layout.RetrievalDims:
    """Versions served side by side share one config.pbtxt, so they must share I/O dims."""
    dims = {v: layout.RetrievalDims.from_meta(layout.read_meta(repo, v)) for v in routing.versions}
    prod = dims[routing.production]
    for v, d in dims.items():
        if d != prod:
            raise ValueError(
                f"retrieval version {v} has dims {d} but production {routing.production} has "
                f"{prod}; versions served side by side share one config.pbtxt, so they must "
                "share history length, category count, K and time gaps (history_ts)"
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
