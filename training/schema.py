"""The data contract every stage reads: three Parquet tables, validated on load.

Errors name the file, the column and what was expected, because the person
reading them is usually looking at someone else's export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_path

USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"


EVENT_TYPES = ("view", "click", "watch", "like", "rating")


class SchemaError(ValueError):
    """Bad input data. The message names the file, the column and the expectation."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int", "float", "str", "datetime"
    required: bool = True


USER_COLUMNS = (
    Column("user_id", "int"),
    Column("gender", "str"),
    Column("age_bucket", "str"),
    Column("activity", "str"),
    Column("occupation", "str", required=False),
)
ITEM_COLUMNS = (
    Column("item_id", "int"),
    Column("genre", "str"),
    Column("provider", "str"),
    Column("release_ts", "int"),  # unix seconds
)
INTERACTION_COLUMNS = (
    Column("user_id", "int"),
    Column("item_id", "int"),
    Column("timestamp", "int"),  # unix seconds
    Column("event_type", "str"),
    Column("value", "float"),  # rating, or watch seconds
)

_KIND_CHECK = {
    "int": pd.api.types.is_integer_dtype,
    "float": lambda s: pd.api.types.is_float_dtype(s) or pd.api.types.is_integer_dtype(s),
    "str": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s),
}


def validate_table(df: pd.DataFrame, columns: tuple[Column, ...], source: str) -> pd.DataFrame:
    """Check presence and type of each column; return the frame with canonical dtypes."""
    if len(df) == 0:
        raise SchemaError(f"{source}: the file is empty; expected at least one row")
    out = {}
    for col in columns:
        if col.name not in df.columns:
            if col.required:
                raise SchemaError(
                    f"{source}: missing column '{col.name}' (expected {col.kind}); "
                    f"found columns {list(df.columns)}"
                )
            out[col.name] = pd.Series(["unknown"] * len(df), index=df.index, dtype=object)
            continue
        s = df[col.name]
        if not _KIND_CHECK[col.kind](s):
            raise SchemaError(
                f"{source}: column '{col.name}' has dtype {s.dtype}; expected {col.kind}"
            )
        if s.isna().any():
            row = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise SchemaError(f"{source}: column '{col.name}' has a missing value at row {row}")
        if col.kind == "int":
            s = s.astype(np.int64)
        elif col.kind == "float":
            s = s.astype(np.float32)
            if not np.isfinite(s.to_numpy()).all():
                raise SchemaError(f"{source}: column '{col.name}' has a non-finite value")
        else:
            s = s.astype(str)
        out[col.name] = s
    return pd.DataFrame(out).reset_index(drop=True)


def _unique_ids(df: pd.DataFrame, column: str, source: str) -> None:
    dup = df[column].duplicated()
    if dup.any():
        examples = df.loc[dup, column].head(3).tolist()
        raise SchemaError(f"{source}: column '{column}' has duplicate ids, e.g. {examples}")


@dataclass(frozen=True)
class Dataset:
    """The three tables of one world, validated and referentially consistent."""

    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame

    @classmethod
    def from_frames(
        cls,
        users: pd.DataFrame,
        items: pd.DataFrame,
        interactions: pd.DataFrame,
        source: str = "<memory>",
    ) -> Dataset:
        u_src, i_src, x_src = (f"{source}/{f}" for f in (USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE))
        users = validate_table(users, USER_COLUMNS, u_src)
        items = validate_table(items, ITEM_COLUMNS, i_src)
        inter = validate_table(interactions, INTERACTION_COLUMNS, x_src)
        _unique_ids(users, "user_id", u_src)
        _unique_ids(items, "item_id", i_src)
        for column, table, name in (("user_id", users, "users"), ("item_id", items, "items")):
            unknown = ~inter[column].isin(table[column])
            if unknown.any():
                examples = inter.loc[unknown, column].unique()[:3].tolist()
                raise SchemaError(
                    f"{x_src}: column '{column}' has {int(unknown.sum())} rows whose id is not in "
                    f"{name}, e.g. {examples}; expected every id to exist in {name}"
                )
        bad_type = ~inter["event_type"].isin(EVENT_TYPES)
        if bad_type.any():
            examples = inter.loc[bad_type, "event_type"].unique()[:3].tolist()
            raise SchemaError(
                f"{x_src}: column 'event_type' has values {examples}; expected one of {EVENT_TYPES}"
            )
        inter = inter.sort_values(["timestamp", "user_id", "item_id"], kind="stable")
        return cls(users, items, inter.reset_index(drop=True))

    @classmethod
    def load(cls, data_dir: str | Path) -> Dataset:
        data_dir = Path(data_dir)
        frames = []
        for name in (USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE):
            path = data_dir / name
            if not path.exists():
                raise SchemaError(f"{path}: file not found; expected a Parquet table")
            try:
                frames.append(pd.read_parquet(path))
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
        return cls.from_frames(*frames, source=str(data_dir))

    def save(self, data_dir: str | Path) -> Path:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, df in (
            (USERS_FILE, self.users),
            (ITEMS_FILE, self.items),
            (INTERACTIONS_FILE, self.interactions),
        ):
            with atomic_path(data_dir / name) as tmp:  # readers never see half a table
                df.to_parquet(tmp, index=False)
        return data_dir
