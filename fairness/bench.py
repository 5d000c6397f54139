"""Time the audit core at scale: `python -m fairness.bench --users 100000`.

Builds ranked lists synthetically (no model, no training) so the figure is the audit's own
cost: per-user metrics, MetricFrame per grouping, the numpy bootstrap, exposure, and
(optionally) the report. One group is given worse lists so the numbers are not all equal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from fairness.audit import AuditConfig, audit
from fairness.gates import check_gates
from fairness.inputs import AuditInput
from fairness.report import write_report


def synthetic_input(n_users: int, n_items: int, k: int = 100, seed: int = 0) -> AuditInput:
    rng = np.random.default_rng(seed)
    user_ids = np.arange(1, n_users + 1, dtype=np.int64)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "gender": rng.choice(["F", "M", "X"], n_users, p=[0.49, 0.48, 0.03]),
            "age_bucket": rng.choice(["18-24", "25-34", "35-44", "45-54", "55+"], n_users),
            "activity": rng.choice(["low", "medium", "high"], n_users),
            "occupation": "unknown",
        }
    )
    items = pd.DataFrame(
        {"item_id": item_ids, "provider": rng.choice(["major", "indie"], n_items, p=[0.3, 0.7])}
    )
    pop = (1.0 + rng.permutation(n_items)) ** -0.8
    pop /= pop.sum()
    # Lists: popularity-biased draws (with repeats in a row, which is fine for timing).
    ranked = item_ids[rng.choice(n_items, size=(n_users, k), p=pop)]
    # Relevance: 5 held-out items per user; half are planted in the list for most users,
    # fewer for the "X" group, so the audit has a real gap to find.
    rel_items = item_ids[rng.choice(n_items, size=(n_users, 5), p=pop)]
    planted = rng.random((n_users, 5)) < np.where(users["gender"] == "X", 0.1, 0.5)[:, None]
    slots = rng.integers(0, min(k, 20), size=(n_users, 5))  # near the top, where K=10 sees
    rows = np.repeat(np.arange(n_users), 5).reshape(n_users, 5)
    ranked[rows[planted], slots[planted]] = rel_items[planted]
    relevant = pd.DataFrame({"user_id": np.repeat(user_ids, 5), "item_id": rel_items.ravel()})
    history = pd.Series(rng.poisson(2000 * pop), index=item_ids)
    return AuditInput(
        user_ids=user_ids,
        ranked=ranked,
        relevant=relevant,
        users=users,
        items=items,
        popularity=history,
        label=f"bench-{n_users}",
        source={"kind": "synthetic-bench"},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--report", help="also write the report here and time it")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    inp = synthetic_input(args.users, args.items)
    t1 = time.perf_counter()
    result = audit(inp, AuditConfig(n_boot=args.n_boot))
    t2 = time.perf_counter()
    print(
        f"input build {t1 - t0:.1f}s; audit core {t2 - t1:.1f}s for {args.users:,} users, "
        f"{args.items:,} items, n_boot={args.n_boot}; stages {result.meta['timings']}"
    )
    if args.report:
        write_report(args.report, result, check_gates(result))
        print(f"report {time.perf_counter() - t2:.1f}s -> {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
