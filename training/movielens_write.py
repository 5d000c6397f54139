"""Write a dataset as MovieLens-100K files (`u.data`, `u.user`, `u.item`).

The reverse of `training.movielens` for the ML-100K layout. It exists so the MovieLens import
path, and the model's standing against the baselines on MovieLens-shaped data, can be
checked end to end on machines where the real files cannot be downloaded: generate a world
of ML-100K's size, write it here, import it with `northstar data movielens`, train.

What the format cannot carry is approximated, and said so in the files' values:
- ratings: ML-100K has 1-5 stars; a dataset's `value` is a rating or watch seconds, so a
  rating column is drawn uniformly from 1-5 unless `value` already holds stars;
- age: ML-100K stores years; each bucket is written as its middle year;
- genre: ML-100K has 19 fixed genre flags; the dataset's genres are mapped onto them in
  sorted order (a dataset with more than 19 genres folds the rest onto the last flags);
- titles carry the release year, which the importer reads back as `release_ts`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.movielens import ML100K_GENRES
from training.schema import Dataset

AGE_YEARS = {"<18": 16, "18-24": 21, "25-34": 30, "35-44": 40, "45-54": 50, "55+": 60}
_ENCODING = "latin-1"


def write_ml100k(ds: Dataset, root: str | Path, *, seed: int = 0) -> Path:
    """Write `ds` to `root` as ML-100K files; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    inter = ds.interactions
    value = inter["value"].to_numpy() if "value" in inter.columns else None
    if value is not None and np.isin(value, [1, 2, 3, 4, 5]).all():
        rating = value.astype(int)
    else:
        rating = np.random.default_rng(seed).integers(1, 6, len(inter))
    pd.DataFrame(
        {
            "u": inter["user_id"].to_numpy(np.int64),
            "i": inter["item_id"].to_numpy(np.int64),
            "r": rating,
            "t": inter["timestamp"].to_numpy(np.int64),
        }
    ).to_csv(root / "u.data", sep="\t", header=False, index=False)
    with open(root / "u.user", "w", encoding=_ENCODING) as f:
        for u in ds.users.itertuples():
            gender = "F" if getattr(u, "gender", "") == "F" else "M"
            age = AGE_YEARS.get(getattr(u, "age_bucket", ""), 30)
            occupation = getattr(u, "occupation", "other") or "other"
            f.write(f"{u.user_id}|{age}|{gender}|{occupation}|00000\n")
    flag_of = _genre_flags(ds.items["genre"].astype(str))
    with open(root / "u.item", "w", encoding=_ENCODING) as f:
        for it in ds.items.itertuples():
            year = pd.Timestamp(int(it.release_ts), unit="s").year
            flags = ["0"] * len(ML100K_GENRES)
            flags[flag_of[str(it.genre)]] = "1"
            f.write(
                f"{it.item_id}|Title {it.item_id} ({year})|01-Jan-{year}||http://example|"
                + "|".join(flags)
                + "\n"
            )
    return root


def _genre_flags(genres: pd.Series) -> dict[str, int]:
    """Each genre's flag index: 1.. in sorted order (0, "unknown", is kept for no genre)."""
    names = sorted(genres.unique())
    last = len(ML100K_GENRES) - 1
    return {g: min(1 + i, last) for i, g in enumerate(names)}
