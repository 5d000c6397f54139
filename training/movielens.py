"""Load a MovieLens release into the schema of training/schema.py.

Supported layouts, detected by which ratings file the folder holds:

- ML-100K: `u.data` (tab: user item rating timestamp), `u.user` (id|age|gender|occupation|zip),
  `u.item` (id|title|release date|video release date|url|19 genre flags), latin-1.
- ML-1M: `ratings.dat`, `users.dat`, `movies.dat`, `::`-separated, latin-1. ML-10M has the same
  files minus `users.dat`; its users then get "unknown" attributes.
- CSV releases (ml-latest, ML-20M, ML-25M): `ratings.csv` (userId,movieId,rating,timestamp)
  and `movies.csv` (movieId,title,genres). No user attributes: gender/age are "unknown".

Every error is a SchemaError that names the file, the line or column, and what was expected:
these files are usually hand-downloaded and sometimes truncated or re-saved by a spreadsheet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from training.schema import Dataset, SchemaError
from training.synth import AGE_BUCKETS, activity_buckets

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# ML-1M age codes -> the synth buckets. "50-55" is folded into "45-54": five of its six years
# are there, and keeping one bucket scheme lets audits compare MovieLens with synth.
ML1M_AGE_BUCKETS = {
    1: "<18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-54", 50: "45-54", 56: "55+",
}  # fmt: skip
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip

# Items in the top 20% by rating count are "major", the rest "indie". See _provider_groups.
MAJOR_TOP_FRACTION = 0.2
UNKNOWN = "unknown"
_TITLE_YEAR = re.compile(r"\((\d{4})[^()]*\)\s*$")  # "Heat (1995)", "Show (1994-1998)"
# All MovieLens text files are latin-1 (or its ASCII subset); latin-1 never fails to decode.
_ENCODING = "latin-1"


def detect_format(path: str | Path) -> str:
    """Return "ml-100k", "ml-1m" or "csv" from which ratings file exists in `path`."""
    root = _root(path)
    for name, fmt in (("u.data", "ml-100k"), ("ratings.dat", "ml-1m"), ("ratings.csv", "csv")):
        if (root / name).is_file():
            return fmt
    raise SchemaError(
        f"{root}: no MovieLens ratings file found; expected one of u.data (ML-100K), "
        f"ratings.dat (ML-1M/10M) or ratings.csv (ml-latest, ML-20M/25M)"
    )


def load_movielens(path: str | Path) -> Dataset:
    """Read a MovieLens folder (format auto-detected) into a validated Dataset.

    Ratings become interactions with event_type "rating" and value = the rating.
    """
    root = _root(path)
    fmt = detect_format(root)
    if fmt == "ml-100k":
        ratings = _ratings_from_text(root / "u.data", "\t")
        users = _users_100k(root / "u.user")
        items = _items_100k(root / "u.item")
    elif fmt == "ml-1m":
        ratings = _ratings_from_text(root / "ratings.dat", "::")
        users_path = root / "users.dat"
        users = _users_1m(users_path) if users_path.exists() else None  # ML-10M has none
        items = _items_dat(root / "movies.dat")
    else:
        ratings = _ratings_csv(root / "ratings.csv")
        users = None
        items = _items_csv(root / "movies.csv")
    ratings_file = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "csv": "ratings.csv"}[fmt]
    if users is None:
        ids = np.unique(ratings["user_id"].to_numpy())
        users = pd.DataFrame(
            {"user_id": ids, "gender": UNKNOWN, "age_bucket": UNKNOWN, "occupation": UNKNOWN}
        )
    _check_known_ids(ratings, users, "user_id", root / ratings_file)
    _check_known_ids(ratings, items, "item_id", root / ratings_file)

    counts = users["user_id"].map(ratings["user_id"].value_counts()).fillna(0).to_numpy()
    users = users.assign(activity=activity_buckets(counts))
    items = _finish_items(items, ratings)
    ratings = ratings.assign(event_type="rating")
    return Dataset.from_frames(
        users[["user_id", "gender", "age_bucket", "activity", "occupation"]],
        items[["item_id", "genre", "provider", "release_ts"]],
        ratings[["user_id", "item_id", "timestamp", "event_type", "value"]],
        source=str(root),
    )


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Years of age -> "<18", then the synth buckets "18-24" ... "55+"."""
    edges = [18, 25, 35, 45, 55]
    labels = np.asarray(("<18", *AGE_BUCKETS), dtype=object)
    return labels[np.searchsorted(edges, np.asarray(age), side="right")]


# ---------------------------------------------------------------------- text formats


def _root(path: str | Path) -> Path:
    root = Path(path)
    if root.is_file():  # a path to one of the files: use its folder
        root = root.parent
    if not root.is_dir():
        raise SchemaError(f"{root}: folder not found; expected a MovieLens folder")
    return root


def _read_records(path: Path, sep: str, fields: Sequence[str]) -> tuple[list[list[str]], list[int]]:
    """Split a delimited text file into records of exactly len(fields) fields.

    Returns the records and their 1-based line numbers (blank lines are skipped), so that
    later errors can point at the exact line.
    """
    if not path.is_file():
        raise SchemaError(f"{path}: file not found; expected lines of {sep.join(fields)}")
    lines = path.read_text(encoding=_ENCODING).splitlines()
    records: list[list[str]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != len(fields):
            raise SchemaError(
                f"{path}: line {number} has {len(parts)} fields separated by {sep!r}; expected "
                f"{len(fields)} ({sep.join(fields)})"
            )
        records.append(parts)
        line_numbers.append(number)
    if not records:
        raise SchemaError(f"{path}: the file is empty; expected lines of {sep.join(fields)}")
    return records, line_numbers


def _column(records: list[list[str]], index: int) -> pd.Series:
    return pd.Series([r[index] for r in records], dtype=object)


def _to_number(
    values: pd.Series, path: Path, field: str, where: Sequence[int] | None, integer: bool
) -> np.ndarray:
    """Parse a column of strings; name the first bad line (or row) and value on failure.

    `where` gives line numbers for text files; None means CSV rows counted after the header.
    """
    parsed = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(parsed)
    if integer:
        bad |= np.isfinite(parsed) & (parsed != np.round(parsed))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        place = f"line {where[r]}" if where is not None else f"row {r + 1} after the header"
        kind = "an integer" if integer else "a number"
        raise SchemaError(
            f"{path}: {place}, field '{field}' is {values.iloc[r]!r}; expected {kind}"
        )
    return parsed.astype(np.int64) if integer else parsed


def _ratings_from_text(path: Path, sep: str) -> pd.DataFrame:
    fields = ("user_id", "item_id", "rating", "timestamp")
    records, where = _read_records(path, sep, fields)
    col = {f: _column(records, k) for k, f in enumerate(fields)}
    return pd.DataFrame(
        {
            "user_id": _to_number(col["user_id"], path, "user_id", where, integer=True),
            "item_id": _to_number(col["item_id"], path, "item_id", where, integer=True),
            "timestamp": _to_number(col["timestamp"], path, "timestamp", where, integer=True),
            "value": _to_number(col["rating"], path, "rating", where, integer=False),
        }
    )


def _users_100k(path: Path) -> pd.DataFrame:
    fields = ("user_id", "age", "gender", "occupation", "zip")
    records, where = _read_records(path, "|", fields)
    age = _to_number(_column(records, 1), path, "age", where, integer=True)
    return pd.DataFrame(
        {
            "user_id": _to_number(_column(records, 0), path, "user_id", where, integer=True),
            "gender": _column(records, 2).str.strip().replace("", UNKNOWN).to_numpy(),
            "age_bucket": age_bucket(age),
            "occupation": _column(records, 3).str.strip().replace("", UNKNOWN).to_numpy(),
        }
    )


def _users_1m(path: Path) -> pd.DataFrame:
    fields = ("user_id", "gender", "age", "occupation", "zip")
    records, where = _read_records(path, "::", fields)
    age_code = _to_number(_column(records, 2), path, "age", where, integer=True)
    occ_code = _to_number(_column(records, 3), path, "occupation", where, integer=True)
    for codes, field, valid in (
        (age_code, "age", sorted(ML1M_AGE_BUCKETS)),
        (occ_code, "occupation", list(range(len(ML1M_OCCUPATIONS)))),
    ):
        bad = ~np.isin(codes, valid)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise SchemaError(
                f"{path}: line {where[r]}, field '{field}' is {int(codes[r])}; expected one of "
                f"the ML-1M codes {valid}"
            )
    return pd.DataFrame(
        {
            "user_id": _to_number(_column(records, 0), path, "user_id", where, integer=True),
            "gender": _column(records, 1).str.strip().replace("", UNKNOWN).to_numpy(),
            "age_bucket": np.array([ML1M_AGE_BUCKETS[int(c)] for c in age_code], dtype=object),
            "occupation": np.asarray(ML1M_OCCUPATIONS, dtype=object)[occ_code],
        }
    )


def _items_100k(path: Path) -> pd.DataFrame:
    genre_fields = tuple(f"genre:{g}" for g in ML100K_GENRES)
    fields = ("item_id", "title", "release_date", "video_release_date", "url", *genre_fields)
    records, where = _read_records(path, "|", fields)
    flags = np.stack(
        [
            _to_number(_column(records, 5 + k), path, f"genre:{g}", where, integer=True)
            for k, g in enumerate(ML100K_GENRES)
        ],
        axis=1,
    )  # (n_items, 19)
    # First listed genre = first flag set, in the file's genre order; none set -> "unknown".
    first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
    released = pd.to_datetime(_column(records, 2), format="%d-%b-%Y", errors="coerce")
    release_ts = _unix_seconds(released)
    title_ts = _title_release_ts(_column(records, 1))
    return pd.DataFrame(
        {
            "item_id": _to_number(_column(records, 0), path, "item_id", where, integer=True),
            "genre": np.asarray(ML100K_GENRES, dtype=object)[first],
            # The release date is more precise than the title's year; use the year when absent.
            "release_ts": np.where(np.isnan(release_ts), title_ts, release_ts),
        }
    )


def _items_dat(path: Path) -> pd.DataFrame:
    records, where = _read_records(path, "::", ("item_id", "title", "genres"))
    return pd.DataFrame(
        {
            "item_id": _to_number(_column(records, 0), path, "item_id", where, integer=True),
            "genre": _first_genre(_column(records, 2)),
            "release_ts": _title_release_ts(_column(records, 1)),
        }
    )


# ---------------------------------------------------------------------- CSV releases


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise SchemaError(f"{path}: file not found; expected a CSV with columns {list(columns)}")
    try:
        df = pd.read_csv(path, encoding="utf-8", encoding_errors="replace")
    except pd.errors.EmptyDataError as exc:
        raise SchemaError(
            f"{path}: the file is empty; expected a CSV with columns {list(columns)}"
        ) from exc
    except pd.errors.ParserError as exc:  # e.g. "Expected 4 fields in line 7, saw 5"
        raise SchemaError(f"{path}: not a well-formed CSV ({exc})") from exc
    for column in columns:
        if column not in df.columns:
            raise SchemaError(
                f"{path}: missing column '{column}'; expected columns {list(columns)}, "
                f"found {list(df.columns)}"
            )
    if len(df) == 0:
        raise SchemaError(f"{path}: the file has a header but no rows")
    return df


def _ratings_csv(path: Path) -> pd.DataFrame:
    df = _read_csv(path, ("userId", "movieId", "rating", "timestamp"))

    def number(column: str, integer: bool) -> np.ndarray:
        s = df[column]
        if integer and pd.api.types.is_integer_dtype(s):
            return s.to_numpy(dtype=np.int64)  # fast path: pandas already parsed it
        return _to_number(s, path, column, None, integer)

    return pd.DataFrame(
        {
            "user_id": number("userId", True),
            "item_id": number("movieId", True),
            "timestamp": number("timestamp", True),
            "value": number("rating", False),
        }
    )


def _items_csv(path: Path) -> pd.DataFrame:
    df = _read_csv(path, ("movieId", "title", "genres"))
    ids = df["movieId"]
    if not pd.api.types.is_integer_dtype(ids):
        ids = pd.Series(_to_number(ids, path, "movieId", None, integer=True))
    return pd.DataFrame(
        {
            "item_id": ids.to_numpy(dtype=np.int64),
            "genre": _first_genre(df["genres"].fillna("").astype(str)),
            "release_ts": _title_release_ts(df["title"].fillna("").astype(str)),
        }
    )


# ---------------------------------------------------------------------- shared mapping


def _first_genre(genres: pd.Series) -> np.ndarray:
    first = genres.str.split("|", n=1).str[0].str.strip()
    first = first.where(~first.isin(["", "(no genres listed)"]), UNKNOWN)
    return first.to_numpy(dtype=object)


def _unix_seconds(times: pd.Series) -> np.ndarray:
    """Datetimes (NaT allowed) -> float unix seconds with NaN for NaT."""
    ns = times.to_numpy(dtype="datetime64[ns]").astype(np.int64).astype(np.float64)
    return np.where(times.isna().to_numpy(), np.nan, ns / 1e9)


def _title_release_ts(titles: pd.Series) -> np.ndarray:
    """Jan 1 (UTC) of the year in the title, e.g. "Heat (1995)"; NaN when there is none."""
    year = pd.to_numeric(titles.str.extract(_TITLE_YEAR, expand=False), errors="coerce")
    dates = pd.to_datetime(year.astype("Int64").astype(str), format="%Y", errors="coerce")
    return _unix_seconds(dates)


def _check_known_ids(ratings: pd.DataFrame, table: pd.DataFrame, column: str, path: Path) -> None:
    """Name the ratings file (not the Parquet one) when a rating points at a missing id."""
    unknown = ~ratings[column].isin(table[column])
    if unknown.any():
        examples = ratings.loc[unknown, column].unique()[:3].tolist()
        kind = "users" if column == "user_id" else "movies"
        raise SchemaError(
            f"{path}: field '{column}' has {int(unknown.sum())} ratings whose id is not in the "
            f"{kind} file, e.g. {examples}; expected every id to be listed there"
        )


def _finish_items(items: pd.DataFrame, ratings: pd.DataFrame) -> pd.DataFrame:
    first_rating = items["item_id"].map(ratings.groupby("item_id")["timestamp"].min())
    fallback = float(ratings["timestamp"].min())  # never rated and no year in the title
    release = items["release_ts"].fillna(first_rating).fillna(fallback).to_numpy()
    # An item cannot be watched before its release; where the source's date is later than
    # the first rating (ML-100K's date is often a re-release), the rating is the truth.
    release = np.minimum(release, first_rating.fillna(np.inf).to_numpy())
    counts = items["item_id"].map(ratings["item_id"].value_counts()).fillna(0).to_numpy()
    return items.assign(
        release_ts=np.floor(release).astype(np.int64),
        provider=_provider_groups(items["item_id"].to_numpy(), counts),
    )


def _provider_groups(item_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Label the top MAJOR_TOP_FRACTION of items by rating count "major", the rest "indie".

    MovieLens has no studio field, but the provider-exposure audit needs a provider group.
    Popularity is the stand-in because in streaming catalogues the big studios own the head
    of the popularity curve (the synth world is built the same way), so the audit asks the
    same question on both: does the recommender push the head further than users' own
    choices do? Ties are broken by item id so the split is deterministic. Note the counts
    cover the whole log: fine for an audit label, a mild future leak if used as a feature.
    """
    order = np.lexsort((item_ids, -counts))  # most rated first, then smaller id
    n_major = math.ceil(MAJOR_TOP_FRACTION * len(item_ids))
    provider = np.full(len(item_ids), "indie", dtype=object)
    provider[order[:n_major]] = "major"
    return provider
