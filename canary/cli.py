"""`northstar retrain`, `northstar canary status|evaluate|promote|rollback`, `schedule`."""

from __future__ import annotations

import argparse
import json
import sys

from common import config as config_mod


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config as .toml/.yaml/.json")
    p.add_argument("--state-dir", help="canary state folder (state.json, mlflow.db, runs/)")
    p.add_argument("--repo", help="Triton model repository")
    p.add_argument("--url", help="Triton gRPC address, e.g. localhost:8001")
    p.add_argument("--labels", help="feedback join output folder")
    p.add_argument("--event-log", help="event log: join it into --labels first")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def _overrides(args, *, metrics: bool = False) -> list[str]:
    out = []
    for flag, key in (
        ("state_dir", "state_dir"),
        ("repo", "repo"),
        ("url", "url"),
        ("labels", "labels"),
        ("event_log", "event_log"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            out.append(f"{key}={v}")
    if metrics and getattr(args, "metrics_url", None):
        out.append(f"metrics_url={args.metrics_url}")
    return out + list(args.set or [])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="feedback -> candidate -> offline gates -> Triton canary")
    _common(p)
    p.set_defaults(func=_retrain)

    c = sub.add_parser("canary", help="the canary on trial: status, evaluate, promote, rollback")
    csub = c.add_subparsers(dest="canary_command", required=True)
    for name, help_ in (
        ("status", "production, canary and the last decisions"),
        ("evaluate", "online test of canary vs production; --auto applies the decision"),
        ("promote", "make the canary production (by hand)"),
        ("rollback", "remove the canary (by hand)"),
    ):
        q = csub.add_parser(name, help=help_)
        _common(q)
        q.add_argument("--metrics-url", help="Triton metrics endpoint, e.g. localhost:8002")
        if name == "evaluate":
            q.add_argument("--auto", action="store_true", help="apply promote / rollback")
        if name in ("promote", "rollback"):
            q.add_argument("--reason", default=None, help="recorded in the decision history")
        q.set_defaults(func=_canary)

    s = sub.add_parser("schedule", help="retrain on cron, label volume or drift; evaluate canaries")
    s.add_argument("--cron", default=None, help='cron expression, e.g. "0 3 * * *"')
    s.add_argument("--once", action="store_true", help="one tick, then exit")
    _common(s)
    s.add_argument("--metrics-url", help="Triton metrics endpoint")
    s.set_defaults(func=_schedule)


def _print(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    print()


def _retrain(args) -> int:
    # lazy, as in every handler here: `northstar --help` loads no handler's dependencies
    from canary.pipeline import RetrainConfig, retrain

    cfg = config_mod.load(RetrainConfig, args.config, _overrides(args))
    res = retrain(cfg)
    _print(res.to_dict())
    return 0 if res.status in ("canary", "rejected", "skipped") else 1


def _canary(args) -> int:
    from canary import online  # lazy: see _retrain

    cfg = config_mod.load(online.EvaluateConfig, args.config, _overrides(args, metrics=True))
    cmd = args.canary_command
    if cmd == "status":
        _print(online.status(cfg.state_dir, cfg.repo))
        return 0
    if cmd == "evaluate":
        if args.auto:
            cfg = config_mod.build(online.EvaluateConfig, {**config_mod.to_dict(cfg), "auto": True})
        ev = online.evaluate_canary(cfg)
        _print({"action": ev.action, "applied": ev.applied, "evidence": ev.evidence})
        return 0
    reasons = [args.reason] if args.reason else None
    fn = online.promote if cmd == "promote" else online.rollback
    _print(fn(cfg, reasons=reasons))
    return 0


def _schedule(args) -> int:
    from canary.schedule import ScheduleConfig, run_forever  # lazy: see _retrain

    base = config_mod.read_file(args.config) if args.config else {}
    common = _overrides(args, metrics=False)
    values = dict(base)
    if args.cron:
        values["cron"] = args.cron
    for section in ("retrain", "evaluate"):
        sec = dict(values.get(section, {}))
        for item in common:
            key, val = item.split("=", 1)
            if "." not in key:
                sec[key] = val
        if section == "evaluate" and args.metrics_url:
            sec["metrics_url"] = args.metrics_url
        values[section] = sec
    for item in common:
        key, val = item.split("=", 1)
        if "." in key:  # retrain.train.epochs=3 and the like
            node = values
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = val
    cfg = config_mod.build(ScheduleConfig, values)
    return run_forever(cfg, once=args.once, on_tick=_print)
