"""`northstar audit`: audit a run, compare it with a baseline, gate it, write the report."""

from __future__ import annotations

import argparse
import dataclasses

import pandas as pd

from common import config as config_mod
from training.schema import Dataset

# Shorthand flag (argparse dest) -> AuditConfig field; each flag defaults to None, so a flag
# left out leaves the field to --config or to AuditConfig's own default.
_FLAGS = (
    ("run", "run"),
    ("data", "data"),
    ("k", "k"),
    ("n_boot", "n_boot"),
    ("seed", "seed"),
    ("label", "label"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="fairness audit of a trained run (users by group, item exposure, gates)",
        description="Audit RUN_DIR on the test period of DIR (history = train + val). Exits 1 "
        "when a gate fails. Settings are AuditConfig's fields (fairness/audit.py): from "
        "--config FILE (an [audit] table or top level), then the flags below, then --set "
        "(the last one given wins); defaults are AuditConfig's. The gates are GateConfig's "
        "(fairness/gates.py): from --gates FILE, else the --config file's [gates] table, "
        "then --set gates.KEY=VALUE.",
    )
    p.add_argument("--run", help="run folder written by `northstar train` (run)")
    p.add_argument("--data", help="dataset folder the run was trained on (data)")
    p.add_argument("--out", required=True, help="report folder, e.g. reports/<name>/")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline-run", help="a second run to audit the same way and compare")
    base.add_argument("--baseline-audit", help="an earlier audit.json (or its folder)")
    p.add_argument(
        "--gates",
        help="GateConfig as .toml/.yaml/.json (a [gates] table or top "
        "level); defaults apply without it",
    )
    p.add_argument(
        "--feedback",
        help="labelled feedback (.parquet or .csv: user_id, "
        "model_version, clicked, value) for the online section",
    )
    p.add_argument("--k", type=int, help="list length (k)")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples for CIs (n_boot)")
    p.add_argument("--seed", type=int, help="bootstrap seed (seed)")
    p.add_argument("--label", help="name in the report (label; default: run folder)")
    config_mod.add_config_args(
        p, "AuditConfig (gates.KEY: GateConfig)", "n_boot=50 ci=0.9 gates.max_gap=0.2"
    )
    p.set_defaults(func=_audit)


def audit_configs(args):
    """(AuditConfig, GateConfig) from the files, the flags and --set (gates.KEY for gates)."""
    # lazy: the CLI handlers' helper; `northstar --help` loads none of their dependencies
    from fairness.audit import AuditConfig
    from fairness.gates import GateConfig

    file = config_mod.read_file(args.config) if args.config else {}
    # An [audit] table, or the top level less a [gates] table that may sit beside it.
    audit_values = (
        file["audit"] if "audit" in file else {k: v for k, v in file.items() if k != "gates"}
    )
    audit_sets = [s for s in args.set if not s.startswith("gates.")]
    gate_sets = [s.removeprefix("gates.") for s in args.set if s.startswith("gates.")]
    flags = [
        f"{key}={getattr(args, dest)}" for dest, key in _FLAGS if getattr(args, dest) is not None
    ]
    cfg = config_mod.load(AuditConfig, None, flags + audit_sets, base=audit_values)
    if not cfg.run or not cfg.data:
        raise config_mod.ConfigError(
            "audit needs run and data: --run DIR --data DIR, or run= and data= in --config / --set"
        )
    if args.gates:
        gates = config_mod.load(GateConfig, args.gates, gate_sets, section="gates")
    else:
        gates = config_mod.load(GateConfig, None, gate_sets, base=file.get("gates", {}))
    return cfg, gates


def _audit(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies
    from fairness.audit import load_audit, run_audit
    from fairness.gates import check_gates, compare
    from fairness.report import write_report

    cfg, gates = audit_configs(args)
    result = run_audit(cfg)
    baseline = None
    if args.baseline_run:
        baseline = run_audit(dataclasses.replace(cfg, run=args.baseline_run, label=""))
        if baseline.label == result.label:  # two runs/ folders with the same leaf name
            baseline.meta["label"] = f"{baseline.label} (baseline)"
    elif args.baseline_audit:
        baseline = load_audit(args.baseline_audit)
    verdict = check_gates(result, gates, baseline)
    comparison = compare(result, baseline) if baseline is not None else None
    online = None
    if args.feedback:
        # lazy: a CLI handler; `northstar --help` loads none of its dependencies
        from fairness.online import online_by_group

        read = pd.read_csv if args.feedback.endswith(".csv") else pd.read_parquet
        online = online_by_group(feedback=read(args.feedback), users=Dataset.load(cfg.data).users)
    paths = write_report(args.out, result, verdict, comparison, online)
    status = "PASS" if verdict.passed else "FAIL"
    print(
        f"audit {result.label}: {status} ({result.meta['n_users']:,} users, "
        f"{result.meta['timings']['total_s']:.1f}s); report {paths['html']}"
    )
    for reason in verdict.reasons:
        print(f"  - {reason}")
    return 0 if verdict.passed else 1
