"""`northstar audit`: audit a run, compare it with a baseline, gate it, write the report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="fairness audit of a trained run (users by group, item exposure, gates)",
        description="Audit RUN_DIR on the test period of DIR (history = train + val). Exits 1 "
        "when a gate fails.",
    )
    p.add_argument("--run", required=True, help="run folder written by `northstar train`")
    p.add_argument("--data", required=True, help="dataset folder the run was trained on")
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
    p.add_argument("--k", type=int, default=10, help="list length (default 10)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name in the report (default: run folder)")
    p.set_defaults(func=_audit)


def _audit(args) -> int:
    import dataclasses

    from common import config as config_mod
    from fairness.audit import AuditConfig, load_audit, run_audit
    from fairness.gates import GateConfig, check_gates, compare
    from fairness.report import write_report

    gates = config_mod.load(GateConfig, args.gates, section="gates")
    cfg = AuditConfig(
        run=args.run, data=args.data, k=args.k, n_boot=args.n_boot, seed=args.seed, label=args.label
    )
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
        import pandas as pd

        from fairness.online import online_by_group
        from training.schema import Dataset

        read = pd.read_csv if args.feedback.endswith(".csv") else pd.read_parquet
        online = online_by_group(feedback=read(args.feedback), users=Dataset.load(args.data).users)
    paths = write_report(args.out, result, verdict, comparison, online)
    status = "PASS" if verdict.passed else "FAIL"
    print(
        f"audit {result.label}: {status} ({result.meta['n_users']:,} users, "
        f"{result.meta['timings']['total_s']:.1f}s); report {paths['html']}"
    )
    for reason in verdict.reasons:
        print(f"  - {reason}")
    return 0 if verdict.passed else 1
