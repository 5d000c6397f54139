"""`northstar diagnose`: why the north star dropped, ranked causes, a plan, a report."""

from __future__ import annotations

import argparse

from common import config as config_mod

# Shorthand flag (argparse dest) -> DiagnoseConfig field.
_FLAGS = (
    "labels",
    "out",
    "current",
    "reference",
    "reference_weeks",
    "log",
    "data",
    "versions",
    "served_features",
    "training_features",
    "previous_recs",
    "previous_version",
    "drift_engine",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="diagnose a drop in the north star: ranked causes, evidence, a plan",
        description="Compare a current window with a reference window (or the weeks before "
        "it) and write report.html, report.json and report.md. Settings are DiagnoseConfig's "
        "fields (diagnose/config.py): --config FILE, then the flags, then --set.",
    )
    p.add_argument("--labels", help="the join's output folder (labels)")
    p.add_argument("--out", help="report folder (out)")
    p.add_argument("--current", help="YYYY-MM-DD:YYYY-MM-DD, UTC, both days included")
    p.add_argument("--reference", help="YYYY-MM-DD:YYYY-MM-DD; default: weeks before current")
    p.add_argument("--reference-weeks", type=int, help="weeks before --current (default 2)")
    p.add_argument("--log", help="event log: unlabelled impressions count as pending")
    p.add_argument("--data", help="dataset folder (users, items, interactions .parquet)")
    p.add_argument("--versions", help="model_version, trained_until table (.json/.parquet/.csv)")
    p.add_argument("--served-features", help="feature log: user_id, ts, features served")
    p.add_argument("--training-features", help="user_id[, ts], features as training saw them")
    p.add_argument("--previous-recs", help="user_id, position, item_id of the previous model")
    p.add_argument("--previous-version", type=int, help="the version to compare against")
    p.add_argument("--drift-engine", choices=("evidently", "scipy"))
    config_mod.add_config_args(p, "DiagnoseConfig", "min_segment_impressions=500 k=20")
    p.set_defaults(func=_diagnose)


def diagnose_config(args):
    """DiagnoseConfig from the --config file, then the flags, then --set."""
    from diagnose.config import DiagnoseConfig

    values = config_mod.read_file(args.config) if args.config else {}
    values = values.get("diagnose", values)
    values.update({f: getattr(args, f) for f in _FLAGS if getattr(args, f, None) is not None})
    given = set(values) | {s.split("=", 1)[0] for s in args.set or []}
    for field, what in _REQUIRED.items():
        if field not in given:
            raise ValueError(f"--{field}: required; expected {what}")
    return config_mod.load(DiagnoseConfig, None, args.set, base=values)


# The fields without a default: a missing one is named as its flag, with what it takes.
_REQUIRED = {
    "labels": "the join's output folder (`northstar feedback join --out`)",
    "current": "the window to diagnose, YYYY-MM-DD:YYYY-MM-DD (UTC)",
    "out": "the report folder",
}


def _diagnose(args) -> int:
    from diagnose.run import diagnose

    cfg = diagnose_config(args)
    result = diagnose(cfg)
    print(result.summary["headline"])
    for i, f in enumerate(result.findings, 1):
        share = f.share_of_drop
        print(f"{i}. {f.cause:<28} explains {f.explained:+.4f} CTR ({share:.0%} of the drop)")
    print(f"report: {cfg.out}/report.html")
    return 0
