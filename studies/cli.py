"""The studies' commands: `northstar simulate freshness|depth|replay|tiers`,
`northstar freshness-cycles` and `northstar stability-study`.

    northstar simulate freshness --preset small --requests 6000 --dir reports/freshness \\
        [--figure studies/figures/freshness_ab.png] [--set users=1000 batch=200]

The four `simulate` studies hang under the simulator's `simulate` command (registered
before this module by northstar/cli.py), so their command lines stay as they were. Each
prints its table (Markdown) and writes its JSON into its work folder (or --set out=...).
"""

from __future__ import annotations

import argparse

from common import config as config_mod
from studies.config import (
    CyclesConfig,
    DepthConfig,
    FreshnessConfig,
    ReplayConfig,
    StabilityStudyConfig,
    TiersStudyConfig,
)

# Shorthand flag (argparse dest) -> FreshnessConfig field.
_FLAGS = (
    ("dir", "dir"),
    ("preset", "preset"),
    ("seed", "seed"),
    ("world", "world"),
    ("run", "run"),
    ("users", "users"),
    ("requests", "requests"),
    ("batch", "batch"),
)


def register(sub: argparse._SubParsersAction) -> None:
    """Every study's subcommand; `simulate`'s are added to the simulator's own parser."""
    simulate = sub.choices.get("simulate")
    if simulate is None:
        raise RuntimeError("studies.cli: register simulator.cli's `simulate` first")
    studies = simulate.add_subparsers(
        dest="simulate_command", metavar="{freshness,depth,replay,tiers}"
    )
    register_freshness(studies)
    register_depth(studies)
    register_replay(studies)
    register_tiers(studies)
    register_cycles(sub)
    register_stability(sub)


def register_cycles(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "freshness-cycles",
        help="retrain cycles with live vs frozen features (studies/freshness_cycles.py)",
    )
    _cycles_arguments(f)
    f.set_defaults(func=_cycles)


def register_stability(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser(
        "stability-study",
        help="churn and accuracy of a retrain with and without the stability term "
        "(studies/stability_study.py)",
    )
    _stability_arguments(st)
    st.set_defaults(func=_stability)


def register_freshness(sub: argparse._SubParsersAction) -> None:
    d = FreshnessConfig  # the defaults shown are the dataclass's

    p = sub.add_parser(
        "freshness",
        help="A/B in the closed loop: live online features (Redis) vs the frozen snapshot",
        description="Settings are FreshnessConfig's fields (studies/freshness.py): from "
        "--config FILE (a [freshness] table or top level), then the flags, then --set.",
    )
    p.add_argument("--dir", help=f"work folder (dir; default {d.dir})")
    p.add_argument("--preset", help=f"world size when no --world (default {d.preset})")
    p.add_argument("--seed", type=int, help=f"world, training and simulator seed ({d.seed})")
    p.add_argument("--world", help="an existing world folder (northstar data synth --out)")
    p.add_argument("--run", help="an existing run trained on that world")
    p.add_argument("--users", type=int, help=f"simulated population (default {d.users})")
    p.add_argument("--requests", type=int, help=f"slates per arm (default {d.requests})")
    p.add_argument("--batch", type=int, help=f"requests per batch (default {d.batch})")
    p.add_argument("--figure", default=None, help="write the bar plot (PNG) here")
    config_mod.add_config_args(p, "FreshnessConfig", "users=1000 batch=200 arms=live")
    p.set_defaults(func=_freshness)


def _study_parser(sub, name: str, cls, module: str, help_: str, example: str, func):
    """A study's subcommand: --dir/--preset/--seed, then --config and --set for the rest of
    its config class's fields."""
    p = sub.add_parser(
        name,
        help=help_,
        description=f"Settings are {cls.__name__}'s fields ({module}): from --config FILE "
        f"(a [{name}] table or top level), then the flags, then --set. Reuses the world "
        "and run already in --dir (trains them the first time).",
    )
    p.add_argument("--dir", help=f"work folder (default {cls.dir})")
    p.add_argument("--preset", help=f"world size when --dir has none (default {cls.preset})")
    p.add_argument("--seed", type=int, help=f"world, training and loop seed ({cls.seed})")
    config_mod.add_config_args(p, cls.__name__, example)
    p.set_defaults(func=func)


def _study_config(cls, args, section: str):
    flags = [f"{k}={getattr(args, k)}" for k in ("dir", "preset", "seed") if getattr(args, k)]
    return config_mod.load(cls, args.config, flags + list(args.set), section=section)


def register_depth(sub: argparse._SubParsersAction) -> None:
    _study_parser(
        sub,
        "depth",
        DepthConfig,
        "studies/depth.py",
        "in-process closed loop: which live state makes CTR fall (seen filter, history, "
        "prior), and how true relevance decays down the model's ranking",
        "users=500 rounds=12",
        _depth,
    )


def _depth(args) -> int:
    from studies.depth import run_depth, tables  # lazy: see _cycles

    cfg = _study_config(DepthConfig, args, "depth")
    result = run_depth(cfg, progress=lambda name: print(f"arm done: {name}", flush=True))
    print(tables(result))
    print(f"\n{result['users']} users; prior {result['prior']}; written to {result['path']}")
    return 0


def register_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="a closed-loop run's request stream served in-process by the oracle and by the "
        "model without retrains: how far any ranking's CTR falls on that traffic",
        description="Settings are ReplayConfig's fields (studies/replay.py): from --config "
        "FILE (a [replay] table or top level), then --set. world and run are required.",
    )
    config_mod.add_config_args(
        p, "ReplayConfig", "world=DIR run=RUN from_cycles=DIR/cycles.json overfetch=100"
    )
    p.set_defaults(func=_replay)


def _replay(args) -> int:
    from studies.replay import run_replay, table  # lazy: see _cycles

    cfg = config_mod.load(ReplayConfig, args.config, list(args.set), section="replay")
    result = run_replay(cfg, progress=lambda line: print(line, flush=True))
    print(table(result))
    print(f"\nwritten to {result['path']}")
    return 0


def register_tiers(sub: argparse._SubParsersAction) -> None:
    _study_parser(
        sub,
        "tiers",
        TiersStudyConfig,
        "studies/label_tiers.py",
        "what each label tier is worth: retrain on the loop's feedback one tier at a time "
        "(final, weighted, strong only, weak with pending)",
        "requests=20000 weak_weight=0.5",
        _tiers,
    )


def _tiers(args) -> int:
    from studies.label_tiers import run_study, table  # lazy: see _cycles

    cfg = _study_config(TiersStudyConfig, args, "tiers")
    result = run_study(cfg, progress=lambda line: print(line, flush=True))
    print(table(result))
    print(f"\njoin: {result['join']}; {result['seconds']} s; written to {result['path']}")
    return 0


def _freshness(args) -> int:
    from studies.freshness import ab_table, plot_ab, run_freshness  # lazy: see _cycles

    flags = [
        f"{key}={getattr(args, dest)}" for dest, key in _FLAGS if getattr(args, dest) is not None
    ]
    cfg = config_mod.load(FreshnessConfig, args.config, flags + list(args.set), section="freshness")
    result = run_freshness(cfg)
    print(ab_table(result))
    la = ", ".join(f"{x:.2f}" for x in result["load_average"])
    print(f"\nload average at the end: {la} on {result['cpus']} CPUs; {result['seconds']} s")
    if args.figure:
        print(f"figure: {plot_ab(result, args.figure)}")
    return 0 if all(a["failed"] == 0 for a in result["arms"].values()) else 1


def _cycles_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help=f"work folder (default {CyclesConfig.dir})")
    p.add_argument("--preset", help=f"world size (default {CyclesConfig.preset})")
    p.add_argument("--seed", type=int)
    p.add_argument("--cycles", type=int, help=f"retrain cycles (default {CyclesConfig.cycles})")
    p.add_argument("--figure", default=None, help="write the per-cycle plot (PNG) here")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: merge the arms of these results files (e.g. one process per arm), "
        "print the table and draw --figure",
    )
    config_mod.add_config_args(p, "CyclesConfig", "users=500 arms=live")


def _cycles(args: argparse.Namespace) -> int:
    """`northstar freshness-cycles`: run (or merge) the arms, print the table, draw."""
    # lazy, as in every handler here: `northstar --help` does not load what a study runs
    from studies.freshness_cycles import cycles_table, merge_results, plot_cycles, run_cycles

    if args.from_json:
        result = merge_results(args.from_json)
    else:
        flags = [
            f"{k}={getattr(args, k)}"
            for k in ("dir", "preset", "seed", "cycles")
            if getattr(args, k) is not None
        ]
        cfg = config_mod.load(CyclesConfig, args.config, flags + list(args.set), section="cycles")
        result = run_cycles(cfg)
    print(cycles_table(result))
    print(f"\nload average after each arm: {result['load_average']}; {result['seconds']} s")
    if args.figure:
        print(f"figure: {plot_cycles(result, args.figure)}")
    return 0 if all(a["failed"] == 0 for a in result["arms"].values()) else 1


def _stability_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help=f"work folder (default {StabilityStudyConfig.dir})")
    p.add_argument("--preset", help=f"world size (default {StabilityStudyConfig.preset})")
    p.add_argument("--seed", type=int)
    config_mod.add_config_args(p, "StabilityStudyConfig", "weights=0,0.5,2 requests=20000")


def _stability(args: argparse.Namespace) -> int:
    from studies.stability_study import run_study, table  # lazy: see _cycles

    flags = [
        f"{k}={getattr(args, k)}" for k in ("dir", "preset", "seed") if getattr(args, k) is not None
    ]
    cfg = config_mod.load(
        StabilityStudyConfig, args.config, flags + list(args.set), section="stability"
    )
    result = run_study(cfg, progress=lambda line: print(line, flush=True))
    print(table(result))
    print(f"\n{result['seconds']} s; written to {result['path']}")
    return 0
