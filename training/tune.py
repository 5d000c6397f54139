"""`northstar tune`: hyper-parameter search on validation only (Optuna, TPE, a time budget).

Each trial is one `train()` run under OUT/trials/NNNN with sampled learning rate, id and
output embedding sizes, the user tower's history encoder (mean or sequence), temperature, an
epoch cap and the popularity prior's beta; its score is the run's validation NDCG@10 (with
early stopping and the prior, both also on validation). Trials evaluate validation only
(`evaluate_test=False`) and only TopPop beside the model, so the test split stays unseen
until a final `northstar train` with the best config. After every trial OUT/ gets:

  best_config.toml   the full TrainConfig of the best trial: `northstar train --config` it
                     (with beta fixed to the tuned value)
  best_config.json   the same, plus the trial's number, params and validation NDCG@10
  study.json         every trial: number, state, params, value, seconds
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import config as config_mod
from common.files import atomic_write_text
from training.schema import Dataset
from training.train import TrainConfig, train

log = logging.getLogger(__name__)

BEST_TOML = "best_config.toml"
BEST_JSON = "best_config.json"
STUDY_JSON = "study.json"


@dataclass(frozen=True)
class TuneConfig:
    out: str = "runs/tune"
    trials: int = 20
    time_budget_s: float = 3600.0  # no trial starts after this; a running one finishes
    seed: int = 0
    # Search space. Log-uniform ranges for lr and temperature; choices for the dims.
    lr: tuple[float, float] = (3e-4, 1e-2)
    temperature: tuple[float, float] = (0.02, 0.2)
    id_dims: tuple[int, ...] = (32, 48, 64)
    out_dims: tuple[int, ...] = (32, 64)
    dropouts: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    logit_adjustments: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)  # full softmax only
    # The user tower's history encoder (TowerConfig.user_encoder): which one a dataset wants
    # (order-blind mean or causal attention) is a property of the data, so validation picks.
    user_encoders: tuple[str, ...] = ("mean", "sequence")
    # Whether a sequence tower also reads time gaps (TowerConfig.time_gaps); searched only in
    # trials that picked the sequence encoder.
    time_gaps: tuple[bool, ...] = (False, True)
    min_epochs: int = 1  # the epoch cap is sampled in [min_epochs, base.epochs]
    max_beta: float = 0.1  # the prior's beta is sampled uniformly in [0, max_beta]

    def __post_init__(self) -> None:
        if self.trials < 1 or not self.time_budget_s > 0:
            raise ValueError("TuneConfig: trials must be >= 1 and time_budget_s > 0")
        if not self.user_encoders or not set(self.user_encoders) <= {"mean", "sequence"}:
            raise ValueError(f"TuneConfig.user_encoders={self.user_encoders}: mean, sequence")
        if not self.time_gaps:
            raise ValueError("TuneConfig.time_gaps: expected one or both of false, true")


def _suggest(trial, base: TrainConfig, cfg: TuneConfig) -> tuple[TrainConfig, dict[str, Any]]:
    params = {
        "lr": trial.suggest_float("lr", *cfg.lr, log=True),
        "temperature": trial.suggest_float("temperature", *cfg.temperature, log=True),
        "tower.id_dim": trial.suggest_categorical("tower.id_dim", list(cfg.id_dims)),
        "tower.out_dim": trial.suggest_categorical("tower.out_dim", list(cfg.out_dims)),
        "tower.dropout": trial.suggest_categorical("tower.dropout", list(cfg.dropouts)),
        "logit_adjustment": trial.suggest_categorical(
            "logit_adjustment", list(cfg.logit_adjustments)
        ),
        "tower.user_encoder": trial.suggest_categorical(
            "tower.user_encoder", list(cfg.user_encoders)
        ),
        "epochs": trial.suggest_int("epochs", min(cfg.min_epochs, base.epochs), base.epochs),
        "prior_beta": trial.suggest_float("prior_beta", 0.0, cfg.max_beta),
    }
    if params["tower.user_encoder"] == "sequence":
        params["tower.time_gaps"] = trial.suggest_categorical(
            "tower.time_gaps", [bool(x) for x in cfg.time_gaps]
        )
    tower = dataclasses.replace(
        base.tower,
        id_dim=params["tower.id_dim"],
        out_dim=params["tower.out_dim"],
        dropout=params["tower.dropout"],
        user_encoder=params["tower.user_encoder"],
        time_gaps=params.get("tower.time_gaps", False),
    )
    trial_cfg = dataclasses.replace(
        base,
        lr=params["lr"],
        temperature=params["temperature"],
        logit_adjustment=params["logit_adjustment"],
        logit_adjustments=(),  # the study searches it: one training per trial
        tower=tower,
        epochs=params["epochs"],
        prior_betas=(params["prior_beta"],),
        out=str(Path(cfg.out) / "trials" / f"{trial.number:04d}"),
        evaluate_test=False,
        refit_epochs=0,  # a trial is scored on validation: nothing to refit for
        baselines=("toppop",),
        resume=False,
        progress=False,
    )
    return trial_cfg, params


def tune(base: TrainConfig, cfg: TuneConfig, *, dataset: Dataset | None = None) -> dict:
    """Run the study; returns the summary written to study.json (plus "best_config")."""
    # lazy: optuna is optional; training runs without it
    import optuna

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else Dataset.load(base.data)
    configs: dict[int, TrainConfig] = {}
    t0 = time.perf_counter()

    def objective(trial) -> float:
        trial_cfg, _ = _suggest(trial, base, cfg)
        configs[trial.number] = trial_cfg
        started = time.perf_counter()
        metrics = train(trial_cfg, dataset=ds)
        value = float(metrics["val"]["model"]["ndcg@10"])
        beta = float(metrics["popularity_prior"]["beta"])
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("beta_used", beta)
        trial.set_user_attr("val_toppop_ndcg@10", metrics["val"]["toppop"]["ndcg@10"])
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"val ndcg@10 is {value}")
        return value

    def after_trial(study, trial) -> None:
        elapsed = time.perf_counter() - t0
        done = [t for t in study.trials if t.value is not None]
        best = study.best_trial if done else None
        log.info(
            "trial %d/%d %s: val ndcg@10 %s | best %s (trial %s) | %.0fs of %.0fs",
            trial.number + 1,
            cfg.trials,
            trial.state.name.lower(),
            "-" if trial.value is None else f"{trial.value:.4f}",
            "-" if best is None else f"{best.value:.4f}",
            "-" if best is None else best.number,
            elapsed,
            cfg.time_budget_s,
        )
        _write(out, study, configs, base, cfg, elapsed)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        study_name=f"northstar-tune-{Path(cfg.out).name}",
    )
    study.optimize(
        objective,
        n_trials=cfg.trials,
        timeout=cfg.time_budget_s,
        callbacks=[after_trial],
        catch=(RuntimeError, ValueError),
        show_progress_bar=base.progress,
    )
    return _write(out, study, configs, base, cfg, time.perf_counter() - t0)


def _write(out: Path, study, configs, base: TrainConfig, cfg: TuneConfig, elapsed: float):
    trials = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "params": t.params,
            **t.user_attrs,
        }
        for t in study.trials
    ]
    done = [t for t in study.trials if t.value is not None]
    summary: dict[str, Any] = {
        "objective": "validation ndcg@10 (test never evaluated)",
        "sampler": f"TPE (seed {cfg.seed})",
        "tune": asdict(cfg),
        "base": asdict(base),
        "elapsed_s": round(elapsed, 1),
        "completed": len(done),
        "trials": trials,
        "best": None,
        "best_config": None,
    }
    if done:
        best = study.best_trial
        best_cfg = dataclasses.replace(
            configs[best.number],
            prior_betas=(float(best.params["prior_beta"]),),
            evaluate_test=base.evaluate_test,
            refit_epochs=base.refit_epochs,
            baselines=base.baselines,
            resume=base.resume,
            progress=base.progress,
            out=base.out,
        )
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run": configs[best.number].out,
        }
        body = asdict(best_cfg)
        atomic_write_text(out / BEST_TOML, _toml(body, header=_toml_header(summary["best"])))
        atomic_write_text(
            out / BEST_JSON, json.dumps({"config": body, **summary["best"]}, indent=1)
        )
        config_mod.build(TrainConfig, config_mod.read_file(out / BEST_TOML))  # round-trips
        summary["best_config"] = str(out / BEST_TOML)
    atomic_write_text(out / STUDY_JSON, json.dumps(summary, indent=1, default=str))
    return summary


def _toml_header(best: dict) -> str:
    return (
        f"# northstar tune: best of the study, trial {best['number']}, "
        f"validation ndcg@10 {best['value']:.5f}\n"
        f"# params: {json.dumps(best['params'], sort_keys=True)}\n"
    )


def _toml_value(v: Any) -> str:
    if v is None:
        return '"none"'  # common.config reads "none" as None for optional fields
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _toml(body: dict[str, Any], header: str = "") -> str:
    """A flat TOML document with one level of tables (TrainConfig's tower and split)."""
    flat = [f"{k} = {_toml_value(v)}" for k, v in body.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, v in body.items()
        if isinstance(v, dict)
    ]
    return header + "\n".join(flat) + "\n" + "\n".join(tables) + "\n"
