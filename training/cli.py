"""`northstar data …`, `northstar train`, `northstar evaluate`, `northstar tune`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from common import config as config_mod
from common.files import atomic_write_text
from training.movielens import load_movielens
from training.movielens_write import write_ml100k
from training.synth import SynthConfig, generate_dataset


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or import a dataset").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="generate a synthetic streaming world with ground truth")
    p.add_argument("--out", required=True, help="output folder for the Parquet tables + world")
    p.add_argument("--preset", default="demo", help="tiny | small | demo | large")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override SynthConfig fields, e.g. n_users=5000",
    )
    p.add_argument(
        "--ml100k",
        metavar="DIR",
        help="also write the world as MovieLens-100K files (u.data, u.user, u.item) to DIR, "
        "for `northstar data movielens`",
    )
    p.set_defaults(func=_synth)

    p = data.add_parser("movielens", help="convert MovieLens files into the northstar schema")
    p.add_argument("--path", required=True, help="folder with ML-100K, ML-1M or CSV files")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_movielens)

    p = sub.add_parser("train", help="train a two-tower model and evaluate it")
    p.add_argument("--data", help="dataset folder (Parquet tables)")
    p.add_argument("--out", help="run folder to write")
    p.add_argument(
        "--grid",
        action="store_true",
        help="train one model per logit adjustment of the grid and keep the best on "
        "validation (logit_adjustments; costs one training each)",
    )
    config_mod.add_config_args(p, "TrainConfig", "epochs=5 tower.out_dim=32")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "tune",
        help="hyper-parameter search on validation NDCG@10 (Optuna TPE, within a time budget)",
        description="Trains one run per trial under OUT/trials/ and scores it on validation "
        "NDCG@10 only (test is never evaluated). Writes OUT/best_config.toml (use it with "
        "`northstar train --config`), OUT/best_config.json and OUT/study.json after every "
        "trial. --config/--set give the fixed TrainConfig the trials start from.",
    )
    p.add_argument("--data", required=True, help="dataset folder (Parquet tables)")
    p.add_argument("--out", required=True, help="folder for the trials and the best config")
    p.add_argument("--trials", type=int, default=20, help="at most this many trials")
    p.add_argument(
        "--time-budget",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="no trial starts after this many seconds (a running one finishes)",
    )
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument(
        "--user-encoders",
        default="mean,sequence",
        help="user tower history encoders to search over (tower.user_encoder), comma-separated",
    )
    config_mod.add_config_args(p, "the base TrainConfig", "epochs=8 batch_size=512")
    p.set_defaults(func=_tune)

    p = sub.add_parser("evaluate", help="recompute RUN_DIR/metrics.json")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.set_defaults(func=_evaluate)


def _synth(args) -> int:
    cfg = SynthConfig.preset(args.preset)
    values = dataclasses.asdict(cfg)
    if args.seed is not None:
        values["seed"] = args.seed
    for item in args.set:
        key, _, val = item.partition("=")
        values[key] = val
    cfg = config_mod.build(SynthConfig, values)
    world, ds = generate_dataset(cfg, progress=True)
    ds.save(args.out)
    world.save(args.out)  # the ground truth next to the Parquet tables
    if args.ml100k:
        write_ml100k(ds, args.ml100k, seed=cfg.seed)
        print(f"wrote MovieLens-100K files to {args.ml100k}")
    print(
        f"wrote {len(ds.users)} users, {len(ds.items)} items, "
        f"{len(ds.interactions)} interactions to {args.out}"
    )
    return 0


def _movielens(args) -> int:
    ds = load_movielens(args.path)
    ds.save(args.out)
    print(
        f"wrote {len(ds.users)} users, {len(ds.items)} items, "
        f"{len(ds.interactions)} interactions to {args.out}"
    )
    return 0


def _train(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies (torch)
    from training.train import LOGIT_ADJUSTMENT_GRID, TrainConfig, train

    overrides = list(args.set)
    if args.grid:  # first, so a --set logit_adjustments=... still wins
        overrides.insert(0, "logit_adjustments=" + ",".join(map(str, LOGIT_ADJUSTMENT_GRID)))
    if args.data:
        overrides.append(f"data={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = config_mod.load(TrainConfig, args.config, overrides)
    train(cfg)
    return 0


def _evaluate(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies (torch)
    from training.evaluate import format_table
    from training.run import METRICS_FILE, load_run
    from training.train import TrainConfig, evaluate_splits, load_training_data

    run = load_run(args.run)
    cfg = config_mod.build(TrainConfig, {**run.meta["train"], "data": args.data})
    ds, sp, train_df = load_training_data(cfg)
    metrics = evaluate_splits(run.model, run.vocab, ds, sp, train_df, cfg)
    path = Path(args.run) / METRICS_FILE
    old = json.loads(path.read_text()) if path.exists() else {}
    if "refit" in old and "val" in old:
        # The saved model was refit on validation (TrainConfig.refit_epochs): its val numbers
        # would score its own training data, so the selected model's stay.
        metrics["val"] = old["val"]
    atomic_write_text(path, json.dumps({**old, **metrics}, indent=1))
    print(format_table({s: metrics[s] for s in ("val", "test") if s in metrics}))
    return 0


def _tune(args) -> int:
    # lazy: a CLI handler; `northstar --help` loads none of its dependencies (torch)
    from training.train import TrainConfig
    from training.tune import TuneConfig, tune

    base = config_mod.load(TrainConfig, args.config, [*args.set, f"data={args.data}"])
    tcfg = TuneConfig(
        trials=args.trials,
        time_budget_s=args.time_budget,
        seed=args.seed,
        out=args.out,
        user_encoders=tuple(e.strip() for e in args.user_encoders.split(",") if e.strip()),
    )
    result = tune(base, tcfg)
    print(
        f"best of {result['completed']} trials: val ndcg@10 {result['best']['value']:.4f} "
        f"with {result['best']['params']}\nwrote {result['best_config']}"
    )
    return 0
