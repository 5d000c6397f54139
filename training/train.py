"""`train(cfg)`: data -> time split -> vocab -> two-tower training -> evaluation -> run dir.

Runs as one process, or under `torchrun` (DDP; gloo on CPU, nccl on GPU).
Every epoch writes a resumable checkpoint; the best epoch by validation
NDCG@10 is kept, and training stops after `patience` epochs without gain.
With a grid of `logit_adjustments` (opt-in: `northstar train --grid`) a fresh full-softmax
run does that once per value and keeps the candidate with the best validation NDCG@10 at
its own prior beta; by default it trains one model.

After training, on validation only: the popularity prior's beta is chosen from
`prior_betas` (`training.popularity`), and EASE's lambda from `ease_lambdas`. Then val
and test are evaluated for the model and every baseline (`training.baselines`) through
the same code, and metrics.json has each with the model's lift over it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.files import atomic_path, atomic_write_text
from models.features import FeatureVocab
from models.loss import StreamingFrequencyEstimator
from models.prior import PopularityPrior, RecentWindow
from models.snapshot import FeatureSnapshot
from models.task import StabilityTerm, TwoTowerTrainTask
from models.towers import TowerConfig, TwoTower
from training.baselines import EASE, EASE_MAX_ITEMS, Baseline, parse_baseline
from training.data import SkipExamples, TrainingExamples
from training.evaluate import evaluate, format_table
from training.run import CHECKPOINT_FILE, FEATURES_FILE, METRICS_FILE, load_run, save_run
from training.schema import Dataset
from training.split import SplitConfig, split

log = logging.getLogger(__name__)

# The logit adjustments `northstar train --grid` compares (TrainConfig.logit_adjustments).
LOGIT_ADJUSTMENT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5)


@dataclass(frozen=True)
class TrainConfig:
    data: str = "data/demo"
    out: str = "runs/demo"
    seed: int = 0
    epochs: int = 12  # room above the demo world's convergence; early stopping trims the rest
    # 0 = by softmax: 256 for the full softmax (more steps an epoch; validation preferred it
    # to 1024), 1024 for the sampled one (its negatives are the batch: bigger is a harder,
    # better softmax).
    batch_size: int = 0
    lr: float = 0.003  # Adam; sparse id embeddings need a larger step than the MLPs
    weight_decay: float = 1e-6
    temperature: float = 0.05  # cosine scores in [-1, 1] need sharpening to separate items
    n_random_negatives: int = 0  # extra uniform negatives help tail items; off by default
    # "sampled": in-batch softmax with logQ correction (any catalogue size). "full": softmax
    # over the whole catalogue each batch (no sampling bias; keeps popularity in the scores).
    # "auto": full up to `full_softmax_max_items` items, where a (batch x items) matrix is cheap.
    softmax: str = "auto"
    full_softmax_max_items: int = 50_000
    # Full softmax only: add this times log(training frequency) of each item to its training
    # logit and leave it out at inference (logit adjustment, Menon et al. 2021). The offset
    # explains that share of the logged popularity, so the learnt scores carry less of it and
    # the popularity prior (beta chosen on validation, within the exposure gate) adds back
    # what helps. 0 = the scores keep all of it, and a loop retraining on its own traffic
    # concentrates exposure; 1 = none, more than the prior grid restores.
    logit_adjustment: float = 0.25
    # Opt-in grid (`northstar train --grid`, or `northstar tune`, which searches it with
    # the rest): how much popularity the scores should keep depends on the data (a time
    # split rewards recent popularity, a per-user split taste), so with two or more values a
    # fresh full-softmax run trains one model per value, each to its early stop, and keeps
    # the one with the best validation NDCG@10 at its own prior beta; the run's saved config
    # records the winner as `logit_adjustment`. Costs one training per value, so the default
    # is none: `logit_adjustment` as given. A warm start keeps its starting run's value.
    logit_adjustments: tuple[float, ...] = ()
    # After early stopping picks the model on validation, train it this many more epochs on
    # train + validation, so the saved model has learned the newest interactions (and the
    # items released during validation) that selection had to hold out. Validation metrics
    # are those of the selected model; test metrics those of the refit one. 0 = off.
    refit_epochs: int = 1
    logq_alpha: float = 0.05  # estimator step size (Yi et al. use ~0.01-0.1)
    history_len: int = 20  # recent items in the user tower; tails off beyond ~20
    n_hash_buckets: int = 256  # shared rows for unknown and cold users
    min_user_interactions: int = 2  # below this a user's own row is noise: use the hashed row
    cold_user_rate: float = 0.05  # share of examples trained through the hashed row
    patience: int = 2  # epochs without val NDCG@10 gain before stopping
    # 0: an epoch is every example once. > 0: at most this many steps an epoch, on a fresh
    # random subset each epoch; a time box for worlds too large for the machine at hand.
    steps_per_epoch: int = 0
    val_users: int = 4000  # val users scored per epoch; the final evaluation uses all
    # 0: the final evaluations (and the prior's curve) score every val and test user. > 0: a
    # seeded sample of this many users per split, for worlds where ranking the whole
    # catalogue for every user would take hours on the machine at hand.
    eval_users: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    resume: bool = True  # continue from RUN_DIR/checkpoint.pt when its config matches
    progress: bool = True
    tower: TowerConfig = field(default_factory=TowerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    # Impressions the user did not pick (user_id, item_id, timestamp parquet; the feedback
    # join's negatives): each step also pushes a batch of them down by `skip_weight` x the
    # unlikelihood term (models.loss.skip_unlikelihood_loss). Full softmax only.
    skip_negatives: str | None = None
    skip_weight: float = 1.0
    # Extra labelled interactions (feedback joins) appended to the training split.
    extra_interactions: str | None = None
    # Warm start: a run dir whose vocabulary and weights training starts from (the canary
    # retrain passes production's run). Used only when the catalogue, categories and tower
    # match; otherwise training starts fresh and metrics["warm_start"] says why.
    init_from: str | None = None
    # With init_from: weight of the stability term (models.task.StabilityTerm), the KL from
    # the starting model's softmax over its own top `stability_k` items to the candidate's.
    # 0 = off. It holds what users see still while the retrain learns the new data.
    stability_weight: float = 0.0
    stability_k: int = 20
    # Baselines evaluated beside the model on val and test (`training.baselines`):
    # "toppop", "recentpop:<7d|10%>" (last days / newest share of the history), "ease".
    baselines: tuple[str, ...] = ("toppop", "recentpop:7d", "recentpop:10%", "ease")
    # EASE's L2 strength, chosen on validation NDCG@10. A given "ease:<lambda>" is used as is.
    ease_lambdas: tuple[float, ...] = (20.0, 100.0, 500.0, 2000.0)
    ease_max_items: int = EASE_MAX_ITEMS  # above this EASE is skipped (N x N float64 matrices)
    # Ranking-time popularity prior beta * log(1 + recent count) (`models.prior`): beta is
    # chosen on validation from this grid (0 always included; () or (0,) = off). Cosine
    # scores lie in [-1, 1] and log(1 + count) in ~[0, 8], so useful betas are ~0.005-0.1.
    prior_betas: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)
    prior_window: str = "10%"  # "recent": the newest 10% of the history, or e.g. "7d"
    # The chosen beta keeps exposure Gini@10 within this (fairness's max_exposure_gini gate).
    prior_max_gini: float | None = 0.95
    # False: evaluate validation only (what `northstar tune` trials do: test stays unseen).
    evaluate_test: bool = True

    def __post_init__(self) -> None:
        if self.stability_weight < 0 or self.stability_k < 2:
            raise ValueError(
                f"stability_weight={self.stability_weight}, stability_k={self.stability_k}: "
                "expected weight >= 0 and k >= 2"
            )
        if not self.skip_weight > 0:
            raise ValueError(f"skip_weight={self.skip_weight}: expected > 0")
        if min(self.refit_epochs, self.batch_size, self.steps_per_epoch, self.eval_users) < 0:
            raise ValueError(
                f"refit_epochs={self.refit_epochs}, batch_size={self.batch_size}, "
                f"steps_per_epoch={self.steps_per_epoch}, eval_users={self.eval_users}: "
                "expected >= 0"
            )
        if self.softmax not in ("sampled", "full", "auto"):
            raise ValueError(f"softmax={self.softmax!r}: expected 'sampled', 'full' or 'auto'")
        for spec in self.baselines:
            parse_baseline(spec)  # a typo fails here, not after training
        RecentWindow.parse(self.prior_window)
        if self.logit_adjustment < 0 or any(a < 0 for a in self.logit_adjustments):
            raise ValueError(
                f"logit_adjustment={self.logit_adjustment}, "
                f"logit_adjustments={self.logit_adjustments}: expected values >= 0"
            )
        if any(b < 0 for b in self.prior_betas) or any(x <= 0 for x in self.ease_lambdas):
            raise ValueError("TrainConfig: prior_betas must be >= 0 and ease_lambdas > 0")


# Fields that only act after training: a checkpoint written under other values still resumes.
_AFTER_TRAINING = (
    "baselines",
    "ease_lambdas",
    "ease_max_items",
    "prior_betas",
    "prior_window",
    "prior_max_gini",
    "evaluate_test",
    "refit_epochs",
    "eval_users",
)


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size())


def _device(d: _Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", d.rank)))
    return torch.device("cpu")


def load_training_data(cfg: TrainConfig, dataset: Dataset | None = None):
    """(dataset, split, training interactions incl. any extra feedback labels).

    `dataset`: `cfg.data` already in memory (a caller that loaded it once passes it down).
    """
    ds = dataset if dataset is not None else Dataset.load(cfg.data)
    sp = split(ds.interactions, cfg.split)
    train_df = sp.train
    if cfg.extra_interactions:
        extra = pd.read_parquet(cfg.extra_interactions)
        # A `weight` column (feedback.tiers: weak < strong) weights those rows in the loss;
        # the base log's rows get 1.
        cols = [*train_df.columns, *(["weight"] if "weight" in extra.columns else [])]
        train_df = pd.concat([train_df, extra[cols]], ignore_index=True)
        train_df = train_df.sort_values("timestamp", kind="stable")
    return ds, sp, train_df


def train(cfg: TrainConfig, *, dataset: Dataset | None = None) -> dict:
    d = _init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(d)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    ds, sp, train_df = load_training_data(cfg, dataset)
    vocab = FeatureVocab.fit(
        ds.users,
        ds.items,
        train_df,
        n_hash_buckets=cfg.n_hash_buckets,
        history_len=cfg.history_len,
        min_user_interactions=cfg.min_user_interactions,
    )
    warm_state, warm = None, {"from": cfg.init_from, "used": False, "reason": "not requested"}
    warm_adjustment = None
    if cfg.init_from:
        vocab, warm_state, warm["reason"], warm_adjustment = _warm_start(cfg, vocab)
        warm["used"] = warm_state is not None
        log.info("warm start from %s: %s", cfg.init_from, warm["reason"])
    examples = TrainingExamples.build(vocab, ds.users, train_df)
    item_cats = torch.from_numpy(
        vocab.encode_item_cats(ds.items.set_index("item_id").loc[vocab.item_ids].reset_index())
    )
    full = cfg.softmax == "full" or (
        cfg.softmax == "auto" and vocab.spec.n_items <= cfg.full_softmax_max_items
    )
    if not cfg.batch_size:
        cfg = replace(cfg, batch_size=256 if full else 1024)
    candidates, why = _adjustment_candidates(cfg, full, warm_state is not None, warm_adjustment)
    setup = _Setup(d, device, vocab, ds, sp, train_df, examples, item_cats, full, warm_state)
    setup.skips = _skip_examples(cfg, vocab, ds, examples)
    fits = [
        _fit(replace(cfg, logit_adjustment=a), setup, warm, len(candidates) > 1) for a in candidates
    ]
    fit, selection, curve = _select_adjustment(cfg, fits, setup, why)
    cfg, model = fit.cfg, fit.task.model
    if warm_state is not None:
        warm["reason"] += "; logQ estimator primed from item frequencies"

    selected, refit = model, None
    if cfg.refit_epochs and len(sp.val):
        if d.main:
            selected = copy.deepcopy(model).cpu()
        if d.world > 1:
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)  # every rank refits the selected weights
        refit = _refit(cfg, d, device, vocab, ds, sp, train_df, fit.wrapped, fit.estimator, fit.opt)
    metrics = {}
    if d.main:
        metrics = _final(
            cfg,
            out,
            selected.cpu(),
            vocab,
            ds,
            sp,
            train_df,
            fit.history,
            time.perf_counter() - t0,
            warm if cfg.init_from else None,
            refit=(model.cpu(), refit) if refit is not None else None,
            adjustment=selection,
            curve=curve,
        )
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


@dataclass
class _Setup:
    """What every candidate of a run trains on: built once, shared by the fits."""

    d: _Dist
    device: torch.device
    vocab: FeatureVocab
    ds: Dataset
    sp: object
    train_df: pd.DataFrame
    examples: TrainingExamples
    item_cats: torch.Tensor
    full: bool
    warm_state: dict | None
    skips: SkipExamples | None = None


@dataclass
class _Fit:
    """One trained candidate: its config, the task (model inside) at its best validation
    epoch, and the optimiser state the refit continues from."""

    cfg: TrainConfig
    task: TwoTowerTrainTask
    wrapped: torch.nn.Module
    estimator: StreamingFrequencyEstimator
    opt: torch.optim.Optimizer
    history: list[dict]


def _adjustment_candidates(
    cfg: TrainConfig, full: bool, warm: bool, warm_adjustment: float | None
) -> tuple[tuple[float, ...], str]:
    """(the logit adjustments this run trains, why): the grid for a fresh full-softmax run,
    else one.

    A warm start keeps its starting run's value: the loaded weights learnt their scores
    under that offset, and fine-tuning them under another would move every item's score by
    the difference of the two offsets before the data moved anything."""
    if not full:
        return (cfg.logit_adjustment,), "not used: sampled softmax"
    if warm and warm_adjustment is not None:
        return (warm_adjustment,), "the warm start's"
    if warm or len(set(cfg.logit_adjustments)) < 2:
        return (cfg.logit_adjustment,), "given"
    return tuple(sorted(set(cfg.logit_adjustments))), "chosen on validation"


def _fit(cfg: TrainConfig, s: _Setup, warm: dict, several: bool) -> _Fit:
    """Train one model to its early stop; the returned task holds its best epoch's weights."""
    d, device, vocab = s.d, s.device, s.vocab
    torch.manual_seed(cfg.seed)
    model = TwoTower(vocab.spec, cfg.tower, s.item_cats)
    if s.warm_state is not None:
        model.load_state_dict(s.warm_state)
    model = model.to(device)
    stability = None
    if cfg.stability_weight > 0 and s.warm_state is not None:
        teacher = TwoTower(vocab.spec, cfg.tower, s.item_cats)
        teacher.load_state_dict(s.warm_state)
        stability = StabilityTerm(
            teacher.to(device),
            weight=cfg.stability_weight,
            k=cfg.stability_k,
            temperature=cfg.temperature,
        )
        warm["stability"] = {"weight": cfg.stability_weight, "k": stability.k}
    elif cfg.stability_weight > 0:
        # Nothing to hold still without a starting model: say so rather than ignore it.
        warm["stability"] = "off: no warm start to hold still"
        log.warning("stability_weight=%s ignored: %s", cfg.stability_weight, warm["reason"])
    task = TwoTowerTrainTask(
        model,
        cfg.temperature,
        cfg.n_random_negatives,
        stability,
        s.full,
        skip_weight=cfg.skip_weight if s.skips is not None else 0.0,
    )
    if s.full and cfg.logit_adjustment:
        task.set_item_log_prior(cfg.logit_adjustment * _log_frequency(s.examples, vocab))
    estimator = StreamingFrequencyEstimator(vocab.spec.n_items, alpha=cfg.logq_alpha).to(device)
    if s.warm_state is not None:
        # The loaded weights are calibrated to a converged logQ correction; a cold estimator
        # (every item "rare") under-corrects tail items for the whole of a short fine-tune,
        # which demotes them (docs/results.md has the coverage and CTR cost). Start from the
        # expected gaps instead.
        _prime_estimator(estimator, s.examples.item_index, cfg.batch_size * d.world)
    # A warm start uses decoupled weight decay (AdamW). Adam's L2 gradient is rescaled by
    # Adam itself, so a row the data never touches (a user or item absent from a window, an
    # item released after the train cutoff) moves by ~lr a step towards 0 however small the
    # decay: a fine-tune erased such rows, items of one category became exact score ties,
    # and ONNX parity (batch of 1 vs batch) failed on tie order. Fresh runs keep Adam.
    opt_cls = torch.optim.AdamW if s.warm_state is not None else torch.optim.Adam
    opt = opt_cls(task.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    wrapped = DistributedDataParallel(task) if d.world > 1 else task

    # Each candidate of a grid resumes from its own checkpoint; a single run keeps the
    # plain name (and resumes checkpoints written before the grid existed).
    name = _candidate_checkpoint(cfg) if several else CHECKPOINT_FILE
    state = _Resume(Path(cfg.out), cfg, name)
    start_epoch, best, best_state, bad_epochs = (
        state.load(model, estimator, opt) if cfg.resume else (0, -1.0, None, 0)
    )
    val_target = _subsample_users(s.sp.val, cfg.val_users, cfg.seed)
    history: list[dict] = []
    if several:
        log.info("logit adjustment %g: training", cfg.logit_adjustment)
    for epoch in range(start_epoch, cfg.epochs):
        loss, steps = _train_epoch(
            cfg, d, device, s.examples, wrapped, estimator, opt, epoch, skips=s.skips
        )
        stop = torch.zeros(1)
        if d.main:
            res = evaluate(
                model=model.cpu(),
                vocab=vocab,
                users=s.ds.users,
                known=s.train_df,
                target=val_target,
            )
            model.to(device)
            ndcg = res["model"].summary["ndcg@10"]
            history.append({"epoch": epoch, "loss": loss, "steps": steps, "val_ndcg@10": ndcg})
            log.info(
                "epoch %d loss %.4f val ndcg@10 %.4f (toppop %.4f)",
                epoch,
                loss,
                ndcg,
                res["toppop"].summary["ndcg@10"],
            )
            if ndcg > best:
                best, bad_epochs = ndcg, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            state.save(epoch + 1, model, estimator, opt, best, best_state, bad_epochs)
            stop[0] = float(bad_epochs >= cfg.patience)
        if d.world > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            log.info("early stop after epoch %d (best val ndcg@10 %.4f)", epoch, best)
            break
    if d.main and best_state is not None:
        model.load_state_dict(best_state)
    return _Fit(cfg, task, wrapped, estimator, opt, history)


def _select_adjustment(
    cfg: TrainConfig, fits: list[_Fit], s: _Setup, why: str
) -> tuple[_Fit, dict, list[dict] | None]:
    """(the fit to keep, metrics["logit_adjustment"], its validation beta curve or None).

    With several candidates each is scored as it would serve: its validation NDCG@10 at the
    prior's beta chosen for it (`training.popularity`, within the same Gini gate). How much
    popularity the scores should keep differs between datasets (a time split rewards recent
    popularity, a per-user split rewards taste), so it is chosen per dataset, on validation.
    """
    # lazy: matplotlib (the popularity curve's plot) is heavy to import
    from training.popularity import choose_beta

    if len(fits) == 1:
        return fits[0], {"value": fits[0].cfg.logit_adjustment, "chosen_by": why}, None
    pick = torch.zeros(1, dtype=torch.long)
    val, betas, curves = [], [], []
    if s.d.main:
        for fit in fits:
            curve = _val_curve(fit.cfg, fit.task.model.cpu(), s.vocab, s.ds, s.sp, s.train_df)
            fit.task.model.to(s.device)
            beta, _ = choose_beta(curve, cfg.prior_max_gini)
            val.append(next(c["ndcg@10"] for c in curve if c["beta"] == beta))
            betas.append(beta)
            curves.append(curve)
            log.info(
                "logit adjustment %g: val ndcg@10 %.4f (beta %g)",
                fit.cfg.logit_adjustment,
                val[-1],
                beta,
            )
        pick[0] = int(np.argmax(val))  # a tie goes to the smaller adjustment (sorted grid)
    if s.d.world > 1:
        dist.broadcast(pick, src=0)
    i = int(pick.item())
    if s.d.main:
        out = Path(cfg.out)
        for j, fit in enumerate(fits):  # only the winner's checkpoint is worth resuming
            ck = out / _candidate_checkpoint(fit.cfg)
            if j == i and ck.exists():
                os.replace(ck, out / CHECKPOINT_FILE)
            else:
                ck.unlink(missing_ok=True)
    if not s.d.main:  # only the main rank scored the candidates and reports them
        return fits[i], {}, None
    keys = [f"{fit.cfg.logit_adjustment:g}" for fit in fits]
    selection = {
        "value": fits[i].cfg.logit_adjustment,
        "chosen_by": "best validation ndcg@10, each candidate at its own prior beta",
        "val_ndcg@10": dict(zip(keys, val, strict=True)),
        "candidates": {
            k: {"beta": b, "val_ndcg@10_beta0": c[0]["ndcg@10"]}
            for k, b, c in zip(keys, betas, curves, strict=True)
        },
    }
    return fits[i], selection, curves[i]


def _candidate_checkpoint(cfg: TrainConfig) -> str:
    return f"checkpoint-adj{cfg.logit_adjustment:g}.pt"


def _val_curve(cfg: TrainConfig, model: TwoTower, vocab, ds, sp, train_df) -> list[dict]:
    """The model's validation NDCG@10, ARP and Gini for every beta of the prior grid (beta 0
    always included, first)."""
    # lazy: matplotlib (the popularity curve's plot) is heavy to import
    from training.popularity import beta_curve

    return beta_curve(
        model,
        vocab=vocab,
        users=ds.users,
        known=train_df,
        target=_eval_target(sp.val, cfg),
        betas=cfg.prior_betas,
        window=cfg.prior_window,
    )


def _refit(cfg, d, device, vocab, ds, sp, train_df, task, estimator, opt) -> dict:
    """`cfg.refit_epochs` more epochs of the selected model over train + validation."""
    both = pd.concat([train_df, sp.val], ignore_index=True)
    examples = TrainingExamples.build(vocab, ds.users, both)
    skips = _skip_examples(cfg, vocab, ds, examples)
    losses = [
        _train_epoch(cfg, d, device, examples, task, estimator, opt, cfg.epochs + e, skips=skips)[0]
        for e in range(cfg.refit_epochs)
    ]
    log.info("refit: %d epoch(s) on train + val (%d examples)", cfg.refit_epochs, len(examples))
    return {"epochs": cfg.refit_epochs, "examples": len(examples), "loss": losses}


def _warm_start(cfg: TrainConfig, fresh: FeatureVocab):
    """(vocab, state_dict or None, reason, the prior run's logit adjustment or None). The
    prior run's vocabulary is kept, so its user rows stay valid (users new since then take
    hashed rows, as they do in serving)."""
    try:
        prior = load_run(cfg.init_from)
    except (FileNotFoundError, OSError, KeyError, ValueError, RuntimeError) as exc:
        return fresh, None, f"cannot load {cfg.init_from} ({exc}); training from scratch", None
    pv = prior.vocab
    mismatch = [
        name
        for name, same in (
            ("item catalogue", np.array_equal(pv.item_ids, fresh.item_ids)),
            ("user categories", pv.user_cats == fresh.user_cats),
            ("item categories", pv.item_cats == fresh.item_cats),
            ("n_hash_buckets", pv.n_hash_buckets == fresh.n_hash_buckets),
            ("history_len", pv.history_len == fresh.history_len),
            ("tower config", prior.tower == cfg.tower),
        )
        if not same
    ]
    if mismatch:
        why = f"vocabulary differs ({', '.join(mismatch)}); training from scratch"
        return fresh, None, why, None
    state = {k: v.detach().clone() for k, v in prior.model.state_dict().items()}
    new_users = int((~np.isin(fresh.user_ids, pv.user_ids)).sum())
    # Runs written before the adjustment was chosen per run carry it in their config too.
    adjustment = prior.meta.get("train", {}).get("logit_adjustment")
    why = f"loaded weights and vocabulary ({new_users} new users use hashed rows)"
    return pv, state, why, None if adjustment is None else float(adjustment)


def _log_frequency(examples: TrainingExamples, vocab: FeatureVocab) -> torch.Tensor:
    """log of each item's share of the training examples; an unseen item counts half."""
    counts = np.bincount(examples.item_index, minlength=vocab.spec.n_items).astype(np.float64)
    return torch.from_numpy(np.log(np.maximum(counts, 0.5) / max(len(examples), 1))).float()


def _prime_estimator(est: StreamingFrequencyEstimator, items: np.ndarray, batch: int) -> None:
    """Set each item's gap (steps between sightings) to its expectation under uniform batches
    of `batch` examples: 1 / P(item in a batch), P = 1 - (1 - count / N) ** batch. Items with
    no example keep the estimator's default (rare)."""
    n = max(len(items), 1)
    counts = np.bincount(items, minlength=est.gap.numel()).astype(np.float64)
    p = -np.expm1(batch * np.log1p(-np.minimum(counts / n, 1.0 - 1e-12)))
    gap = np.where(counts > 0, 1.0 / np.maximum(p, 1e-12), est.gap.cpu().numpy())
    with torch.no_grad():
        est.gap.copy_(torch.from_numpy(np.minimum(gap, est.gap.cpu().numpy())))


def _eval_target(df: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """A split's rows as the final evaluations score them: every user, or `eval_users`."""
    return _subsample_users(df, cfg.eval_users, cfg.seed) if cfg.eval_users > 0 else df


def _subsample_users(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    users = df["user_id"].unique()
    if len(users) <= n:
        return df
    keep = np.random.default_rng(seed).choice(users, n, replace=False)
    return df[df["user_id"].isin(keep)]


def _skip_examples(cfg, vocab, ds, examples: TrainingExamples) -> SkipExamples | None:
    """cfg.skip_negatives read against `examples` (their history at impression time)."""
    if not cfg.skip_negatives:
        return None
    skips = SkipExamples.build(vocab, ds.users, pd.read_parquet(cfg.skip_negatives), examples)
    log.info("skip negatives: %d impressions at weight %g", len(skips), cfg.skip_weight)
    return skips if len(skips) else None


def _train_epoch(
    cfg, d, device, examples, task, estimator, opt, epoch, *, skips=None
) -> tuple[float, int]:
    """(mean loss, optimizer steps) of one epoch. With `skips`, every step also draws a
    batch of them (with replacement: there are usually far more skips than positives)."""
    # Seeded per epoch: a resumed run replays exactly the batches it would have seen.
    rng = np.random.default_rng([cfg.seed, epoch])
    torch.manual_seed(cfg.seed * 1000 + epoch)
    perm = rng.permutation(len(examples))
    cold = rng.random(len(examples)) < cfg.cold_user_rate
    # Its own stream, so the positives' batches are the same with or without skips.
    skip_rng = np.random.default_rng([cfg.seed, epoch, 1])
    n_batches = len(perm) // (cfg.batch_size * d.world)  # equal batches on every rank
    n_batches = max(n_batches, 1)
    if cfg.steps_per_epoch > 0:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    task.train()
    total = 0.0
    bar = tqdm(
        range(n_batches),
        desc=f"epoch {epoch}",
        disable=not (cfg.progress and d.main),
        leave=False,
        mininterval=1.0,
    )
    for b in bar:
        start = (b * d.world + d.rank) * cfg.batch_size
        rows = perm[start : start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in examples.batch(rows, cold_mask=cold[rows]).items()}
        items = batch["item_index"]
        # Every rank sees the global batch's items so all estimators stay identical.
        global_items = items
        if d.world > 1:
            gathered = [torch.empty_like(items) for _ in range(d.world)]
            dist.all_gather(gathered, items)
            global_items = torch.cat(gathered)
        estimator.update(global_items)
        log_q = torch.log(estimator.probability(items))
        neg = None
        if cfg.n_random_negatives:
            neg = torch.randint(0, estimator.gap.numel(), (cfg.n_random_negatives,), device=device)
        skip_batch = None
        if skips is not None:
            srows = skip_rng.integers(0, len(skips), size=cfg.batch_size)
            skip_batch = {k: v.to(device) for k, v in skips.batch(srows, examples).items()}
        loss = task(batch, log_q, neg, skips=skip_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        if b % 20 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return total / n_batches, n_batches


class _Resume:
    """Per-epoch checkpoint: tensors and plain numbers only, so `weights_only=True` loads it."""

    def __init__(self, out: Path, cfg: TrainConfig, name: str = CHECKPOINT_FILE):
        self.path = out / name
        fields = asdict(cfg) | {"out": None, "resume": None, "progress": None, "epochs": None}
        # A candidate is its logit_adjustment; the grid it came from does not change it.
        del fields["logit_adjustments"]
        if fields["init_from"] is None:  # checkpoints written before warm starts still resume
            del fields["init_from"]
        if not fields["stability_weight"]:  # ... and those before the stability term
            del fields["stability_weight"], fields["stability_k"]
        if fields["tower"]["user_encoder"] == "mean":  # ... and those before the sequence tower
            for name in ("user_encoder", "seq_layers", "seq_heads"):
                del fields["tower"][name]
        if not fields["tower"]["time_gaps"]:  # ... and those before time gaps
            del fields["tower"]["time_gaps"]
        if not fields["steps_per_epoch"]:  # ... and those before the step cap
            del fields["steps_per_epoch"]
        if not fields["skip_negatives"]:  # ... and those before skip negatives
            del fields["skip_negatives"], fields["skip_weight"]
        for name in _AFTER_TRAINING:
            del fields[name]
        self.fingerprint = json.dumps(fields, sort_keys=True, default=str)

    def load(self, model, estimator, opt):
        # A finished grid kept its winner as checkpoint.pt: that candidate (and only it:
        # the fingerprint holds the adjustment) continues from there.
        path = self.path if self.path.exists() else self.path.with_name(CHECKPOINT_FILE)
        if not path.exists():
            return 0, -1.0, None, 0
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck["fingerprint"] != self.fingerprint:
            if path == self.path:  # another candidate's winner there is no surprise
                log.warning("%s was written with another config; starting from scratch", path)
            return 0, -1.0, None, 0
        model.load_state_dict(ck["model"])
        estimator.load_state_dict(ck["estimator"])
        opt.load_state_dict(ck["opt"])
        log.info("resuming from %s at epoch %d", path, ck["epoch"])
        return ck["epoch"], ck["best"], ck["best_state"], ck["bad_epochs"]

    def save(self, epoch, model, estimator, opt, best, best_state, bad_epochs) -> None:
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "estimator": estimator.state_dict(),
            "opt": opt.state_dict(),
            "best": best,
            "best_state": best_state,
            "bad_epochs": bad_epochs,
            "fingerprint": self.fingerprint,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def _baselines(cfg: TrainConfig) -> list[Baseline]:
    return [parse_baseline(b, ease_max_items=cfg.ease_max_items) for b in cfg.baselines]


def _choose_ease(cfg, model_free_eval, n_items: int) -> tuple[list[Baseline], dict, dict]:
    """(baselines with EASE's lambda chosen on val, {"ease": info}, the winner's val result).

    `model_free_eval(baselines)` evaluates the validation split without the model."""
    base = _baselines(cfg)
    ease = [b for b in base if isinstance(b, EASE)]
    given = any(s.strip().lower().startswith("ease:") for s in cfg.baselines)
    if not ease or given or len(cfg.ease_lambdas) < 2 or n_items > cfg.ease_max_items:
        return base, {}, {}
    grid, best, best_res = {}, None, None
    for lam in cfg.ease_lambdas:
        res = model_free_eval([EASE(lam, max_items=cfg.ease_max_items)]).get("ease")
        if res is None:
            return base, {}, {}
        grid[f"{lam:g}"] = res.summary["ndcg@10"]
        if best is None or res.summary["ndcg@10"] > best_res.summary["ndcg@10"]:
            best, best_res = lam, res
    chosen = EASE(best, max_items=cfg.ease_max_items)
    base = [chosen if isinstance(b, EASE) else b for b in base]
    info = {"lambda_chosen_on": "val ndcg@10", "val_ndcg@10_by_lambda": grid}
    return base, info, {"ease": best_res}


def evaluate_splits(
    model, vocab, ds, sp, train_df, cfg: TrainConfig | None = None, *, test_model=None
) -> dict:
    """val: history = train; test: history = train + val (they happened before the test).
    `test_model`: the model test reports (a refit on train + val), default `model`.

    The model (with its popularity prior, if any) and every baseline of `cfg`, each through
    `evaluate`; with a prior also "model_beta0", the same model without it. EASE's lambda is
    chosen on val. metrics["baselines"] says what each baseline was, or why it was skipped.
    """
    cfg = TrainConfig() if cfg is None else cfg

    def on_val(baselines, **kw):
        return evaluate(
            model=kw.pop("model", None),
            vocab=vocab,
            users=ds.users,
            known=train_df,
            target=_eval_target(sp.val, cfg),
            baselines=baselines,
            **kw,
        )

    baselines, ease_info, ease_val = _choose_ease(cfg, on_val, len(vocab.item_ids))
    val = on_val([b for b in baselines if b.name not in ease_val], model=model)
    val.update(ease_val)
    out = {"val": {k: r.summary for k, r in val.items()}}
    skipped = dict(val.skipped)
    with_prior = getattr(model, "prior", None) is not None
    if with_prior:
        out["val"]["model_beta0"] = on_val([], model=model, prior=None)["model"].summary
    if cfg.evaluate_test:
        known_test = pd.concat([train_df, sp.val], ignore_index=True).sort_values(
            "timestamp", kind="stable"
        )

        def on_test(baselines, **kw):
            return evaluate(
                model=model if test_model is None else test_model,
                vocab=vocab,
                users=ds.users,
                known=known_test,
                target=_eval_target(sp.test, cfg),
                baselines=baselines,
                **kw,
            )

        test = on_test(baselines)
        out["test"] = {k: r.summary for k, r in test.items()}
        skipped |= test.skipped
        if with_prior:
            out["test"]["model_beta0"] = on_test([], prior=None)["model"].summary
    out["baselines"] = {
        b.name: {
            **b.describe(),
            **(ease_info if isinstance(b, EASE) else {}),
            "skipped": skipped.get(b.name),
        }
        for b in baselines
    }
    return out


def _choose_prior(cfg, out, model, vocab, ds, sp, train_df, curve=None) -> dict:
    """Pick beta on validation, draw the curve, and set the model's prior with the bias as of
    all the data (what serving starts from). Returns metrics["popularity_prior"]. `curve`:
    the model's validation curve when the caller already has it (the adjustment grid)."""
    # lazy: matplotlib (the popularity curve's plot) is heavy to import
    from training.popularity import PLOT_FILE, choose_beta, plot_curve

    if not any(b > 0 for b in cfg.prior_betas):
        model.set_prior(None)
        return {"beta": 0.0, "window": cfg.prior_window, "chosen_by": "prior off (no beta > 0)"}
    if curve is None:
        curve = _val_curve(cfg, model, vocab, ds, sp, train_df)
    beta, why = choose_beta(curve, cfg.prior_max_gini)
    plot = plot_curve(curve, beta, out / PLOT_FILE, cfg.prior_max_gini)
    prior = PopularityPrior(beta, cfg.prior_window)
    everything = pd.concat([train_df, sp.val, sp.test], ignore_index=True)
    bias = prior.bias(
        vocab.item_index(everything["item_id"].to_numpy()),
        everything["timestamp"].to_numpy(np.int64),
        len(vocab.item_ids),
    )
    model.set_prior(prior, torch.from_numpy(bias))
    log.info("popularity prior: beta %g (%s)", beta, why)
    return {
        "beta": beta,
        "window": cfg.prior_window,
        "chosen_by": why,
        "max_exposure_gini": cfg.prior_max_gini,
        "curve_split": "val",
        "curve": curve,
        "plot": plot.name if plot else None,
    }


def _final(
    cfg,
    out,
    model,
    vocab,
    ds,
    sp,
    train_df,
    history,
    seconds,
    warm=None,
    refit=None,
    adjustment=None,
    curve=None,
):
    """Choose the prior and report val on the selected `model`; with `refit` (the refit model,
    its info), test is the refit model's and the refit model is what is saved."""
    prior = _choose_prior(cfg, out, model, vocab, ds, sp, train_df, curve)
    test_model = model
    if refit is not None:
        test_model = refit[0]
        test_model.set_prior(model.prior, model.item_bias.clone())
    metrics = evaluate_splits(model, vocab, ds, sp, train_df, cfg, test_model=test_model)
    model = test_model
    metrics["popularity_prior"] = prior
    if adjustment is not None:
        metrics["logit_adjustment"] = adjustment
    if refit is not None:
        metrics["refit"] = {**refit[1], "val_metrics_from": "the selected model, before refit"}
    metrics["train_seconds"] = round(seconds, 1)
    metrics["epochs"] = history
    if warm is not None:
        metrics["warm_start"] = warm
    save_run(
        out,
        model,
        vocab,
        {
            "train": asdict(cfg),
            "data_dir": str(Path(cfg.data).resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cutoffs": {"t_val": sp.t_val, "t_test": sp.t_test},
        },
    )
    # Serving starts from everything known at training time, test period included.
    all_known = pd.concat([train_df, sp.val, sp.test], ignore_index=True).sort_values(
        "timestamp", kind="stable"
    )
    FeatureSnapshot.build(vocab, ds.users, all_known).save(out / FEATURES_FILE)
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=1))
    log.info(
        "wrote %s in %.1fs\n%s",
        out,
        seconds,
        format_table({s: metrics[s] for s in ("val", "test") if s in metrics}),
    )
    final = "test" if cfg.evaluate_test else "val"
    if not math.isfinite(metrics[final]["model"]["ndcg@10"]):
        raise RuntimeError(f"{final} NDCG is not finite: training diverged")
    return metrics
