"""The studies' settings, one typed config per study, in a module of their own: the
commands (studies/cli.py) show these defaults in `--help` without loading what the
studies run (torch, tritonserver, the canary loop). The defaults are the only ones.
"""

from __future__ import annotations

from dataclasses import dataclass

ARMS = ("frozen", "live")  # the freshness studies' arms: frozen snapshots, live features
POLICIES = ("oracle", "model")  # the replay's rankers


# `northstar simulate freshness`: studies/freshness.py
@dataclass(frozen=True)
class FreshnessConfig:
    """`northstar simulate freshness --config FILE` (a [freshness] table or top level) and
    `--set KEY=VALUE`; the flags are shorthands for some fields. These defaults are the only
    ones."""

    dir: str = "reports/freshness"  # work folder: world, run, one folder per arm
    preset: str = "small"  # world size when `world` is not given: tiny | small | demo | large
    seed: int = 0  # world, training and simulator seed
    world: str | None = None  # a world folder (northstar data synth --out); default DIR/data
    run: str | None = None  # a run trained on that world; default: trained into DIR/run
    train_epochs: int = 12  # when the run is trained here (early stopping trims it)
    users: int = 1000  # simulated population, drawn by activity
    requests: int = 6000  # slates per arm
    batch: int = 200  # requests per simulate() call; its clicks are sent when it ends
    # Seconds between batches, in both arms: longer than the store cache's TTL (0.2 s), so
    # a click acknowledged at a batch's end is what the next batch's first read sees.
    batch_pause_s: float = 0.5
    k: int = 10
    concurrency: int = 4
    arms: tuple[str, ...] = ARMS
    out: str | None = None  # results JSON; default DIR/freshness.json

    def __post_init__(self) -> None:
        for name in ("users", "requests", "batch", "k", "concurrency", "train_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"FreshnessConfig.{name}={getattr(self, name)}: expected >= 1")
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"FreshnessConfig.arms={self.arms}: expected some of {ARMS}")


# `northstar simulate depth`: studies/depth.py
@dataclass
class DepthConfig:
    dir: str = "reports/freshness"  # where `simulate freshness` put data/ and run/
    preset: str = "small"  # world size when dir has none yet
    seed: int = 0
    world: str | None = None
    run: str | None = None
    users: int = 500  # drawn by activity; every one gets a slate each round
    rounds: int = 12
    k: int = 10
    rewatch_factor: float = 0.2  # the simulator's default
    shown_cap: int = 2  # the `shown_cap` arm: unclicked showings before an item is dropped
    betas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4)
    out: str | None = None  # default DIR/depth.json

    def __post_init__(self) -> None:
        if min(self.users, self.rounds, self.k, self.shown_cap) < 1:
            raise ValueError("users, rounds, k and shown_cap must be >= 1")
        if not 0.0 <= self.rewatch_factor <= 1.0:
            raise ValueError(f"rewatch_factor={self.rewatch_factor}: expected 0..1")
        self.betas = tuple(float(b) for b in self.betas)


# `northstar simulate replay`: studies/replay.py
@dataclass
class ReplayConfig:
    world: str = ""  # folder with world.npz and the dataset the run was trained on
    run: str = ""  # the run production served (its model and catalogue)
    # Where the spans end: a cycles.json (its burn-in, then each cycle's served_requests),
    # or `spans`, request counts per span. One of the two is required.
    from_cycles: str | None = None
    spans: tuple[int, ...] = ()
    # The traffic's draws, as studies.freshness_cycles sets them: batch b is seed + b.
    seed: int = 1000
    users: int = 500  # population per batch (SimulateConfig.users)
    batch: int = 200  # requests per batch (SimulateConfig.requests)
    k: int = 10
    overfetch: int = 100  # the model policy's graph cut: k + overfetch candidates
    prior: bool = True  # the model policy adds the run's popularity prior, as the graph does
    policies: tuple[str, ...] = POLICIES
    click_seed: int = 0  # the click draws (the same for every policy)
    out: str | None = None  # default: next to from_cycles, else reports/replay/replay.json
    figure: str | None = None  # a PNG of CTR and clicks per request per span, if given

    def __post_init__(self) -> None:
        if not self.world or not self.run:
            raise ValueError("replay: world and run are required (folders)")
        self.spans = tuple(int(s) for s in self.spans)
        self.policies = tuple(self.policies)
        if bool(self.from_cycles) == bool(self.spans):
            raise ValueError("replay: give exactly one of from_cycles (a cycles.json) and spans")
        if any(s < 1 for s in self.spans):
            raise ValueError(f"replay: spans={self.spans}; expected request counts >= 1")
        if min(self.users, self.batch, self.k) < 1 or self.overfetch < 0:
            raise ValueError("replay: users, batch and k must be >= 1, overfetch >= 0")
        unknown = set(self.policies) - set(POLICIES)
        if unknown or not self.policies:
            raise ValueError(f"replay: policies={self.policies}; expected some of {POLICIES}")


# `northstar simulate tiers`: studies/label_tiers.py
@dataclass
class FeedbackStudyConfig:
    """What every study on the loop's simulated feedback shares: the world and production
    run, the simulated traffic and its cut, and the warm fine-tune each arm runs."""

    dir: str = "reports/feedback"
    preset: str = "small"
    seed: int = 0
    world: str | None = None
    run: str | None = None
    train_epochs: int = 12  # the production run, when --dir has none yet
    users: int = 2000  # simulated population
    requests: int = 20_000  # slates in the simulated loop
    span_windows: float = 4.0  # the traffic spans this many windows; the newest is pending
    window_s: float = 1800.0
    epochs: int = 2  # the warm fine-tune of canary `warm_window`
    lr: float = 0.001
    out: str | None = None  # default: a JSON file in DIR

    def __post_init__(self) -> None:
        if self.requests < 1 or self.users < 1 or self.epochs < 1:
            raise ValueError("requests, users and epochs must be >= 1")
        if not self.span_windows > 1:
            raise ValueError(f"span_windows={self.span_windows}: expected > 1")


# `northstar simulate tiers`: studies/label_tiers.py
@dataclass
class TiersStudyConfig(FeedbackStudyConfig):
    dir: str = "reports/tiers"
    strong_watch_s: float = 1200.0
    weak_weight: float = 0.5
    eval_users: int = 500  # users whose top 10 is scored against the world's relevance


# `northstar stability-study`: studies/stability_study.py
@dataclass
class StabilityStudyConfig(FeedbackStudyConfig):
    dir: str = "reports/stability"
    weights: tuple[float, ...] = (0.0, 0.5, 2.0)
    k: int = 20  # the stability term's top k
    eval_k: int = 10  # churn and accuracy at this list length, as the offline gates

    def __post_init__(self) -> None:
        super().__post_init__()
        self.weights = tuple(float(w) for w in self.weights)
        if any(w < 0 for w in self.weights) or not self.weights:
            raise ValueError(f"weights={self.weights}: expected one or more values >= 0")


# `northstar freshness-cycles`: studies/freshness_cycles.py
@dataclass(frozen=True)
class CyclesConfig:
    """`northstar freshness-cycles --config FILE` ([cycles] table or top level) and
    `--set KEY=VALUE`; these defaults are the only ones."""

    dir: str = "reports/freshness"  # work folder: world, run, one folder per arm
    preset: str = "small"
    seed: int = 0
    world: str | None = None
    run: str | None = None
    train_epochs: int = 12  # the base model, when trained here
    cycles: int = 5
    arms: tuple[str, ...] = ARMS
    users: int = 500  # simulated population
    batch: int = 200  # requests per traffic batch
    k: int = 10
    # Candidates the graph returns beyond k, for the seen filter to remove (ExportConfig).
    # A user whose seen set covers most of the graph's k + overfetch gets a short slate.
    overfetch: int = 100
    concurrency: int = 4
    requests_per_look: int = 300
    max_looks: int = 20
    canary_percent: int = 50
    retrain_epochs: int = 2
    retrain_lr: float = 0.001
    window_days: float = 60.0
    min_impressions: int = 3000  # per arm, before the CTR test may decide
    max_impressions: int = 8000  # per arm: the fixed horizon (non-inferiority)
    # Requests production serves alone before the first retrain. Every simulated user starts
    # having clicked nothing, a state a running service is never in, so the first cycle
    # measures that start-up as much as the loop; a burn-in of about one cycle's traffic
    # lets the cycles start from a steady state. Its north star is reported as cycle 0.
    burn_in_requests: int = 300
    # > 0: each retrain also learns from the impressions users skipped (RetrainConfig).
    skip_weight: float = 0.0
    # The control: > 0 means no retrains at all; each "cycle" is this many requests served
    # by production alone. With the same world, run and seed the request stream (which
    # users come, in which order) is the retrain run's, so its per-cycle north star is what
    # the same traffic gets from the base model: the share of a fall that is users using up
    # their items rather than anything a retrain did. Give it the retrain run's requests
    # per cycle.
    control_requests: int = 0
    # After the run, serve its exact request stream in-process with the world's oracle
    # (studies.replay) and report its CTR per cycle: what the best possible ranking
    # gets from the same requests, using up its users' items as it goes. "Best
    # attainable" is the oracle slate given the run's own clicks, which stays flat.
    oracle_replay: bool = True
    out: str | None = None  # results JSON; default DIR/cycles.json

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"CyclesConfig.cycles={self.cycles}: expected >= 1")
        if self.control_requests < 0:
            raise ValueError(
                f"CyclesConfig.control_requests={self.control_requests}: expected >= 0"
            )
        if self.burn_in_requests < 0:
            raise ValueError(
                f"CyclesConfig.burn_in_requests={self.burn_in_requests}: expected >= 0"
            )
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"CyclesConfig.arms={self.arms}: expected some of {ARMS}")
