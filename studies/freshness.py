"""Live online features against the frozen per-version snapshot, in the closed loop.

    northstar simulate freshness --preset small --requests 6000 --out reports/freshness

One world, one trained run, one simulator seed; two arms, one after the other, each on
its own real `tritonserver` with its own event log:

- **frozen**: every version reads its feature snapshot (`features.npz`, built at training
  time). What users click while it serves never reaches their history or seen set.
- **live**: the same run, with the shared online store (`serving/live.py`): a real
  `redis-server`, seeded from the world's dataset before serving; the `feedback` model
  applies each acknowledged click to it, so the next slate knows it.

Both arms draw the same population and the same sequence of users (the simulator's draws
come from the seed before any slate is served). Traffic goes in batches of `batch`
requests: a batch's clicks reach the server when the batch ends (`simulate`), so what
the live store can change is everything from the next batch on. The simulated users
remember their clicks and rarely click the same item again (`ClickMemory`,
`SimulateConfig.rewatch_factor`), as people rarely rewatch a film at once.

Per arm it reports the north star of the served traffic (CTR with its Wilson interval and
engaged value per impression with its normal interval, `feedback.metrics`), from the
event log joined with every window closed, and the share of impressions that showed a
user an item they had clicked in an earlier batch (`SimReport.rewatch_impressions`, counted
against the simulator's memory of what each user clicked), plus the share of items the
user had in the world's history (the seen set both arms start from; should be 0).

The five-retrain-cycle half of the study needs the canary pipeline, which sits above this
package: `northstar freshness-cycles` (studies/freshness_cycles.py) reuses
`prepare` and `arm_server` from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from common.figures import save_png
from common.redis_server import RedisServer
from feedback.join import JoinConfig, read_labels, run_join
from feedback.metrics import north_star_table
from online.store import RedisFeatureStore
from serving.publish import ExportConfig, export
from serving.server import ServerConfig, TritonServer
from simulator.behaviour import ClickMemory
from simulator.config import SimReport, SimulateConfig
from simulator.driver import simulate
from studies.config import FreshnessConfig
from training.run import METRICS_FILE
from training.schema import Dataset
from training.synth import SynthConfig, World, generate_dataset
from training.train import TrainConfig, train

log = logging.getLogger(__name__)

INF = float("inf")


# ---------------------------------------------------------------------------- world + run


def prepare_for(cfg) -> tuple[Path, Path]:
    """`prepare` with a study config's dir, preset, seed, world, run and train_epochs (the
    A/B's and the retrain cycles' configs share them)."""
    return prepare(
        cfg.dir,
        preset=cfg.preset,
        seed=cfg.seed,
        world=cfg.world,
        run=cfg.run,
        train_epochs=cfg.train_epochs,
    )


def prepare(
    root: str | Path,
    *,
    preset: str = "small",
    seed: int = 0,
    world: str | None = None,
    run: str | None = None,
    train_epochs: int = 12,
) -> tuple[Path, Path]:
    """(world dir, run dir): the given ones, or a world of `preset` generated into
    ROOT/data and a model trained on it into ROOT/run, reused when already there."""

    root = Path(root)
    data = Path(world) if world else root / "data"
    if world is None:
        marker = data / "synth.json"
        want = {"preset": preset, "seed": seed}
        if not (marker.exists() and json.loads(marker.read_text()) == want):
            log.info("generating the %s world (seed %d) into %s", preset, seed, data)
            w, ds = generate_dataset(SynthConfig.preset(preset, seed=seed), progress=False)
            ds.save(data)
            w.save(data)
            marker.write_text(json.dumps(want))
    out = Path(run) if run else root / "run"
    if run is None and not ((out / METRICS_FILE).exists() and (out / "model.pt").exists()):
        log.info("training the two-tower model on %s into %s", data, out)
        train(
            TrainConfig(
                data=str(data), out=str(out), seed=seed, epochs=train_epochs, progress=False
            )
        )
    return data, out


def export_template(
    path: str | Path, run: str | Path, *, k: int = 10, overfetch: int = 100
) -> Path:
    """Export `run` once into a fresh repository at `path`, for arm_server(template=)."""

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    export(ExportConfig(run=str(run), repo=str(path), k=k, overfetch=overfetch))
    return path


@dataclass
class ArmServer:
    """One arm's running stack: the server, its repository and log, Redis when live."""

    name: str
    root: Path
    repo: Path
    event_log: Path
    server: Any  # serving.server.TritonServer
    redis: Any = None  # common.redis_server.RedisServer, live arm only

    @property
    def live(self) -> bool:
        return self.redis is not None

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url


@contextlib.contextmanager
def arm_server(
    root: str | Path,
    run: str | Path,
    *,
    live: bool,
    world: str | Path,
    k: int = 10,
    overfetch: int = 100,
    template: str | Path | None = None,
) -> Iterator[ArmServer]:
    """Export `run` into a fresh ROOT/model_repository (production), start a real
    tritonserver on free ports with its event log at ROOT/events.db and, when `live`, a
    real redis-server as its online store, seeded from the world's dataset (`world`, the
    users and every interaction: what the run's snapshot was built from). Everything under
    ROOT from an earlier run of the same arm is removed first. `template`: a repository
    `export_template` wrote, copied instead of exporting again (the same bytes per arm)."""

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    repo = root / "model_repository"
    if template is not None:
        shutil.copytree(template, repo)
    else:
        export(ExportConfig(run=str(run), repo=str(repo), k=k, overfetch=overfetch))
    redis = None
    with contextlib.ExitStack() as stack:
        if live:
            redis = RedisServer(root / "redis").start()
            stack.callback(redis.close)
            ds = Dataset.load(world)
            store = RedisFeatureStore(redis.url)
            try:
                stats = store.seed(
                    ds.users, ds.interactions.sort_values("timestamp", kind="stable")
                )
            finally:
                store.close()
            log.info(
                "online store %s seeded: %d users, %d history rows in %.1f s",
                redis.url,
                stats.users,
                stats.interactions,
                stats.seconds,
            )
        events = root / "events.db"
        server = TritonServer(
            ServerConfig.on_free_ports(
                str(repo),
                event_log=str(events),
                online_store=redis.url if redis is not None else None,
                log_file=str(root / "tritonserver.log"),
            )
        ).start()
        stack.callback(server.stop)
        yield ArmServer("live" if live else "frozen", root, repo, events, server, redis)


# ---------------------------------------------------------------------------- measuring


def served_north_star(labels: pd.DataFrame, *, by: list[str] | None = None) -> list[dict]:
    """CTR (Wilson 95%) and engaged value per impression (normal 95%) of `labels`, one row
    per `by` group (the whole frame when `by` is empty), from feedback.metrics."""

    if labels.empty:
        return []
    lab = labels.assign(value=labels["value"].fillna(0.0).astype(float), _all="all")
    table = north_star_table(lab, by=by or ["_all"])
    rows = table.drop(columns=["_all"], errors="ignore").to_dict(orient="records")
    return [{k: _plain(v) for k, v in r.items()} for r in rows]


def _plain(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return None if math.isnan(v) else float(v)
    return v


def join_labels(event_log: str | Path, labels_dir: str | Path, window_s: float) -> pd.DataFrame:
    """Join the whole log (every window closed) and return its labels."""

    run_join(JoinConfig(log=str(event_log), out=str(labels_dir), window_s=window_s, as_of=INF))
    return read_labels(labels_dir)


def history_seen_share(labels: pd.DataFrame, interactions: pd.DataFrame) -> float:
    """Share of impressions whose (user, item) is in the world's interaction log: items the
    seen set both arms start from already holds (the filter should make this 0)."""
    if labels.empty:
        return math.nan
    known = pd.MultiIndex.from_frame(
        interactions[["user_id", "item_id"]].drop_duplicates().astype(np.int64)
    )
    shown = pd.MultiIndex.from_frame(labels[["user_id", "item_id"]].astype(np.int64))
    return float(shown.isin(known).mean())


class StampedMemory(ClickMemory):
    """ClickMemory that also remembers in which batch each (user, item) was first clicked,
    so what a user had clicked before any batch can be recovered afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.batch = 0  # set by closed_loop before each batch
        self.first_batch: dict[tuple[int, int], int] = {}

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        super().add(users, items)
        for pair in zip(map(int, users), map(int, items), strict=True):
            self.first_batch.setdefault(pair, self.batch)

    def before(self, batch: int) -> set[tuple[int, int]]:
        return {p for p, b in self.first_batch.items() if b < batch}


@dataclass
class LoopResult:
    reports: list[SimReport] = field(default_factory=list)
    memory: StampedMemory = field(default_factory=StampedMemory)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.reports)

    @property
    def failed(self) -> int:
        return sum(r.requests_failed for r in self.reports)

    @property
    def items_returned(self) -> int:
        return sum(r.items_returned for r in self.reports)

    @property
    def rewatch_impressions(self) -> int:
        return sum(r.rewatch_impressions for r in self.reports)

    @property
    def rewatch_share(self) -> float:
        n = self.items_returned
        return self.rewatch_impressions / n if n else math.nan


def closed_loop(
    sim: SimulateConfig,
    *,
    batches: int,
    pause_s: float = 0.0,
    progress: Callable[[SimReport], None] | None = None,
) -> LoopResult:
    """`batches` simulate() calls of `sim.requests` each, seeds sim.seed, sim.seed + 1, ...
    (the same users in the same order for any server), one ClickMemory across them."""
    out = LoopResult()
    for i in range(batches):
        out.memory.batch = i
        rep = simulate_batch(replace(sim, seed=sim.seed + i), out.memory)
        out.reports.append(rep)
        if progress is not None:
            progress(rep)
        if pause_s and i + 1 < batches:
            time.sleep(pause_s)
    return out


def simulate_batch(sim: SimulateConfig, memory: ClickMemory) -> SimReport:
    return simulate(sim, memory=memory)


def attainable_ctr(
    world,
    user_idx: np.ndarray,
    *,
    k: int,
    history: set[tuple[int, int]],
    clicked_before: set[tuple[int, int]],
    rewatch_factor: float,
) -> float:
    """The expected CTR of the best k-slate an oracle could show each of these users (dense
    indices, one per request) under the simulator's click model: items sorted by
    relevance at the world's end (the simulator's "today"), items in the user's world
    history excluded (the seen filter of both arms), items the user clicked in an earlier
    batch at `rewatch_factor` of their relevance; mean over requests of
    sum_pos examination(pos) * relevance / k. A falling value means users have used up
    their best items: no model can win those clicks back."""
    u = np.asarray(user_idx, dtype=np.int64)
    if not len(u):
        return math.nan
    items = np.arange(world.n_items)
    rel = world.relevance(u[:, None], items[None, :], world.cfg.end_ts)  # (R, I)
    rows = {int(x): np.nonzero(u == x)[0] for x in np.unique(u)}
    for uu, ii in history:
        r = rows.get(uu)
        if r is not None:
            rel[r, ii] = 0.0
    for uu, ii in clicked_before:
        r = rows.get(uu)
        if r is not None:
            rel[r, ii] *= rewatch_factor
    top = -np.sort(-rel, axis=1)[:, :k]
    exam = world.examination(np.arange(top.shape[1]))
    return float((top * exam).sum(axis=1).mean() / k)


def _world_history(world, ds) -> set[tuple[int, int]]:
    """(user index, item index) of every interaction in the world's log."""
    inter = ds.interactions
    return set(
        zip(
            world.user_index(inter["user_id"].to_numpy()).tolist(),
            world.item_index(inter["item_id"].to_numpy()).tolist(),
            strict=True,
        )
    )


def attainable_per_batch(
    world, ds, labels: pd.DataFrame, loop: LoopResult, *, k: int, rewatch_factor: float
) -> list[float]:
    """attainable_ctr for the users of each batch, given what they had clicked before it."""
    users_of = labels.drop_duplicates("request_id").set_index("request_id")["user_id"]
    history = _world_history(world, ds)
    out = []
    for b, rep in enumerate(loop.reports):
        ids = users_of.reindex(pd.Index(rep.request_ids)).dropna().to_numpy(np.int64)
        u = world.user_index(ids)
        wanted = set(u.tolist())
        hist = {p for p in history if p[0] in wanted}
        before = {p for p in loop.memory.before(b) if p[0] in wanted}
        out.append(
            attainable_ctr(
                world, u, k=k, history=hist, clicked_before=before, rewatch_factor=rewatch_factor
            )
        )
    return out


def attainable_per_span(
    world, ds, labels: pd.DataFrame, spans: list[list[str]], *, k: int, rewatch_factor: float
) -> list[float]:
    """attainable_ctr for the users of each span of requests (e.g. one retrain cycle), given
    every click the loop logged before the span's first impression (from `labels`, the
    join's output: request_id, user_id, item_id, impression_ts, clicked)."""
    history = _world_history(world, ds)
    by_request = labels.drop_duplicates("request_id").set_index("request_id")
    clicks = labels[labels["clicked"].to_numpy(bool)]
    click_u = world.user_index(clicks["user_id"].to_numpy())
    click_i = world.item_index(clicks["item_id"].to_numpy())
    click_ts = clicks["impression_ts"].to_numpy(np.float64)
    out = []
    for ids in spans:
        rows = by_request.reindex(pd.Index(ids)).dropna(subset=["user_id"])
        if not len(rows):
            out.append(math.nan)
            continue
        u = world.user_index(rows["user_id"].to_numpy(np.int64))
        wanted = set(u.tolist())
        start = float(rows["impression_ts"].min())
        early = click_ts < start
        before = {
            (int(a), int(b))
            for a, b in zip(click_u[early], click_i[early], strict=True)
            if int(a) in wanted
        }
        hist = {pair for pair in history if pair[0] in wanted}
        out.append(
            attainable_ctr(
                world, u, k=k, history=hist, clicked_before=before, rewatch_factor=rewatch_factor
            )
        )
    return out


PRIOR_CLICK_BINS = (0, 1, 3, 6, 11)  # bucket lower edges: 0, 1-2, 3-5, 6-10, 11+


def by_prior_clicks(world, labels: pd.DataFrame, loop: LoopResult) -> list[dict[str, Any]]:
    """Impressions grouped by how many items their user had clicked in earlier batches:
    impressions, CTR and the mean true relevance of the items shown (the world's
    P(click | examined) at its end). Where it falls as users click more, what is served
    after the user's first clicks is further down the model's ranking."""
    if labels.empty:
        return []
    batch_of = {rid: b for b, rep in enumerate(loop.reports) for rid in rep.request_ids}
    first = loop.memory.first_batch
    per_user: dict[int, list[int]] = {}
    for (uu, _), b in first.items():
        per_user.setdefault(uu, []).append(b)
    for v in per_user.values():
        v.sort()
    lab = labels[labels["request_id"].isin(batch_of.keys())]
    u = world.user_index(lab["user_id"].to_numpy())
    i = world.item_index(lab["item_id"].to_numpy())
    b = lab["request_id"].map(batch_of).to_numpy()
    prior = np.array(
        [np.searchsorted(per_user.get(int(uu), []), bb) for uu, bb in zip(u, b, strict=True)]
    )
    rel = world.relevance(u, i, world.cfg.end_ts)
    edges = np.asarray(PRIOR_CLICK_BINS)
    bucket = np.searchsorted(edges, prior, side="right") - 1
    out = []
    for j, lo in enumerate(edges):
        m = bucket == j
        if not m.any():
            continue
        hi = edges[j + 1] - 1 if j + 1 < len(edges) else None
        out.append(
            {
                "prior_clicks": f"{lo}" if hi == lo else (f"{lo}-{hi}" if hi else f"{lo}+"),
                "impressions": int(m.sum()),
                "ctr": float(lab["clicked"].to_numpy()[m].mean()),
                "mean_relevance": float(rel[m].mean()),
            }
        )
    return out


# ---------------------------------------------------------------------------- the A/B


def run_arm(
    cfg: FreshnessConfig, name: str, world: Path, run: Path, template: Path | None = None
) -> dict[str, Any]:
    """One arm end to end: serve, closed-loop traffic, join, measure."""

    root = Path(cfg.dir) / name
    n_batches = math.ceil(cfg.requests / cfg.batch)
    t0 = time.perf_counter()
    arm = arm_server(root, run, live=name == "live", world=world, k=cfg.k, template=template)
    with arm as srv:
        sim = SimulateConfig(
            world=str(world),
            users=cfg.users,
            requests=cfg.batch,
            url=srv.grpc_url,
            protocol="grpc",
            seed=cfg.seed + 1000,
            k=cfg.k,
            concurrency=cfg.concurrency,
            request_id_share=1.0,
        )
        bar = tqdm(total=n_batches * cfg.batch, unit="req", desc=f"{name:>6}", leave=True)
        per_batch: list[dict[str, Any]] = []

        def tick(rep: SimReport) -> None:
            bar.update(rep.requests)
            per_batch.append(
                {
                    "requests": rep.requests,
                    "failed": rep.requests_failed,
                    "impressions": rep.items_returned,
                    "clicks": rep.clicks,
                    "rewatch_impressions": rep.rewatch_impressions,
                }
            )
            bar.set_postfix(
                ctr=f"{rep.clicks / max(rep.items_returned, 1):.3f}",
                reshown=f"{rep.rewatch_impressions / max(rep.items_returned, 1):.3f}",
            )

        try:
            loop = closed_loop(sim, batches=n_batches, pause_s=cfg.batch_pause_s, progress=tick)
        finally:
            bar.close()
        serve_s = time.perf_counter() - t0
        labels = join_labels(srv.event_log, root / "labels", sim.window_s)
    ds = Dataset.load(world)
    ns = served_north_star(labels)

    w = World.load(world)
    ceiling = attainable_per_batch(w, ds, labels, loop, k=cfg.k, rewatch_factor=sim.rewatch_factor)
    for row, c in zip(per_batch, ceiling, strict=True):
        row["attainable_ctr"] = c
    return {
        "arm": name,
        "online_store": name == "live",
        "requests": loop.requests,
        "failed": loop.failed,
        "impressions_returned": loop.items_returned,
        "impressions_logged": len(labels),
        "users_served": int(labels["user_id"].nunique()) if len(labels) else 0,
        "north_star": ns[0] if ns else None,
        "reshown_clicked": loop.rewatch_impressions,
        "reshown_clicked_share": loop.rewatch_share,
        "history_seen_share": history_seen_share(labels, ds.interactions),
        "per_batch": per_batch,
        "by_prior_clicks": by_prior_clicks(w, labels, loop),
        "seconds": round(serve_s, 1),
    }


def run_freshness(cfg: FreshnessConfig) -> dict[str, Any]:
    """Prepare the world and run, then each arm in turn; returns (and writes) the results."""
    t0 = time.perf_counter()
    world, run = prepare_for(cfg)
    template = export_template(Path(cfg.dir) / "export", run, k=cfg.k)
    arms = {}
    for name in cfg.arms:
        log.info("arm %s: %d requests in batches of %d", name, cfg.requests, cfg.batch)
        arms[name] = run_arm(cfg, name, world, run, template)
        log.info("arm %s: %s", name, _line(arms[name]))
    return write_study(cfg, world, run, arms, list(os.getloadavg()), t0, "freshness.json")


def write_study(cfg, world, run, arms: dict, load_average: list, t0: float, name: str) -> dict:
    """A study's result (config, world, run, arms, load, seconds), written to `cfg.out` or
    `cfg.dir/name` as JSON; the A/B here and the retrain cycles (canary) both use it."""
    result = {
        "config": asdict(cfg),
        "world": str(world),
        "run": str(run),
        "arms": arms,
        "load_average": load_average,
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(cfg.out) if cfg.out else Path(cfg.dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return result


def _line(arm: dict[str, Any]) -> str:
    ns = arm["north_star"] or {}
    return (
        f"CTR {fmt(ns.get('ctr'))} [{fmt(ns.get('ctr_low'))}, {fmt(ns.get('ctr_high'))}], "
        f"value/imp {fmt(ns.get('value_per_impression'), '.2f')}, "
        f"re-shown clicked {fmt(arm['reshown_clicked_share'])}, "
        f"{arm['requests']} requests, {arm['failed']} failed"
    )


def fmt(v, spec: str = ".4f") -> str:
    """A figure for a table; n/a for a missing or NaN one."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def ab_table(result: dict[str, Any]) -> str:
    """The A/B as a Markdown table."""
    lines = [
        "| arm | requests (failed) | impressions | CTR [95% Wilson] | engaged value / impression "
        "[95%] | re-shown clicked items | in world history |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, a in result["arms"].items():
        ns = a["north_star"] or {}
        lines.append(
            f"| {name} | {a['requests']:,} ({a['failed']}) | {a['impressions_logged']:,} | "
            f"{fmt(ns.get('ctr'))} [{fmt(ns.get('ctr_low'))}, {fmt(ns.get('ctr_high'))}] | "
            f"{fmt(ns.get('value_per_impression'), '.2f')} [{fmt(ns.get('value_low'), '.2f')}, "
            f"{fmt(ns.get('value_high'), '.2f')}] | "
            f"{a['reshown_clicked']:,} ({100 * a['reshown_clicked_share']:.2f}%) | "
            f"{100 * a['history_seen_share']:.2f}% |"
        )
    return "\n".join(lines)


def plot_ab(result: dict[str, Any], path: str | Path) -> Path:
    """Bars: CTR and engaged value per impression with their 95% intervals, and the share
    of re-shown clicked items, per arm; plus CTR per batch over the run."""
    arms = result["arms"]
    names = list(arms)
    colors = {"frozen": "#c0504d", "live": "#4f81bd"}
    fig = Figure(figsize=(15, 3.6))
    axes = fig.subplots(1, 4)
    for ax, key, lo, hi, title in (
        (axes[0], "ctr", "ctr_low", "ctr_high", "CTR (95% Wilson)"),
        (
            axes[1],
            "value_per_impression",
            "value_low",
            "value_high",
            "engaged value / impression (95%)",
        ),
    ):
        vals = [arms[n]["north_star"][key] for n in names]
        err = [
            [v - arms[n]["north_star"][lo] for n, v in zip(names, vals, strict=True)],
            [arms[n]["north_star"][hi] - v for n, v in zip(names, vals, strict=True)],
        ]
        ax.bar(names, vals, yerr=err, capsize=6, color=[colors.get(n, "grey") for n in names])
        ax.set_title(title, fontsize=10)
    bars = axes[2].bar(
        names,
        [100 * arms[n]["reshown_clicked_share"] for n in names],
        color=[colors.get(n, "grey") for n in names],
    )
    axes[2].bar_label(bars, fmt="%.2f%%")
    axes[2].set_title("impressions of items already clicked (%)", fontsize=10)
    for n in names:
        pb = arms[n]["per_batch"]
        ctr = [b["clicks"] / max(b["impressions"], 1) for b in pb]
        x = np.cumsum([b["requests"] for b in pb])
        axes[3].plot(x, ctr, label=f"{n}: served", color=colors.get(n, "grey"))
        if all("attainable_ctr" in b for b in pb):
            axes[3].plot(
                x,
                [b["attainable_ctr"] for b in pb],
                ":",
                label=f"{n}: best attainable",
                color=colors.get(n, "grey"),
            )
    axes[3].set_title("CTR per batch (dotted: oracle slate)", fontsize=10)
    axes[3].set_xlabel("requests")
    axes[3].legend(fontsize=7)
    return save_png(fig, path)
