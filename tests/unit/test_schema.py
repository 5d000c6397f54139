"""The data contract: bad tables fail with a message that names the file and the column."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from training.schema import Dataset, SchemaError


def users() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "gender": ["F", "M", "X"],
            "age_bucket": ["18-24", "25-34", "55+"],
            "activity": ["low", "medium", "high"],
            "occupation": ["unknown", "writer", "artist"],
        }
    )


def items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [10, 20],
            "genre": ["drama", "comedy"],
            "provider": ["major", "indie"],
            "release_ts": [1_600_000_000, 1_700_000_000],
        }
    )


def interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 2, 3, 1],
            "item_id": [10, 10, 20, 20],
            "timestamp": [1_700_000_300, 1_700_000_100, 1_700_000_200, 1_700_000_000],
            "event_type": ["watch", "click", "like", "rating"],
            "value": [120.0, 3.0, 60.5, 4.0],
        }
    )


def test_valid_tables_round_trip(tmp_path: Path) -> None:
    ds = Dataset.from_frames(users(), items(), interactions())
    assert ds.interactions["timestamp"].is_monotonic_increasing
    ds.save(tmp_path)
    loaded = Dataset.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.interactions, ds.interactions)
    pd.testing.assert_frame_equal(loaded.users, ds.users)


def test_optional_occupation_defaults_to_unknown() -> None:
    ds = Dataset.from_frames(users().drop(columns="occupation"), items(), interactions())
    assert set(ds.users["occupation"]) == {"unknown"}


def test_missing_column_names_file_and_column() -> None:
    with pytest.raises(SchemaError, match=r"src/items\.parquet: missing column 'provider'"):
        Dataset.from_frames(users(), items().drop(columns="provider"), interactions(), "src")


def test_wrong_type_names_file_and_column() -> None:
    bad = interactions().assign(timestamp=["a", "b", "c", "d"])
    with pytest.raises(
        SchemaError,
        match=r"src/interactions\.parquet: column 'timestamp' has dtype object; "
        r"expected int",
    ):
        Dataset.from_frames(users(), items(), bad, "src")
    bad_users = users().assign(user_id=[1.5, 2.0, 3.0])
    with pytest.raises(SchemaError, match=r"users\.parquet: column 'user_id'.*expected int"):
        Dataset.from_frames(bad_users, items(), interactions(), "src")


def test_missing_value_names_column_and_row() -> None:
    bad = interactions().astype({"value": float})
    bad.loc[2, "value"] = float("nan")
    with pytest.raises(SchemaError, match=r"interactions\.parquet: column 'value'.*row 2"):
        Dataset.from_frames(users(), items(), bad, "src")


def test_empty_file(tmp_path: Path) -> None:
    Dataset.from_frames(users(), items(), interactions()).save(tmp_path)
    interactions().iloc[:0].to_parquet(tmp_path / "interactions.parquet", index=False)
    with pytest.raises(SchemaError, match=r"interactions\.parquet: the file is empty"):
        Dataset.load(tmp_path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"users\.parquet: file not found"):
        Dataset.load(tmp_path)
    Dataset.from_frames(users(), items(), interactions()).save(tmp_path)
    (tmp_path / "items.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match=r"items\.parquet: not a readable Parquet file"):
        Dataset.load(tmp_path)


def test_duplicate_ids_name_file_and_column() -> None:
    dup = pd.concat([users(), users().iloc[[1]]])
    with pytest.raises(SchemaError, match=r"users\.parquet: column 'user_id' has duplicate ids"):
        Dataset.from_frames(dup, items(), interactions(), "src")
    dup_items = pd.concat([items(), items().iloc[[0]]])
    with pytest.raises(SchemaError, match=r"items\.parquet: column 'item_id' has duplicate ids"):
        Dataset.from_frames(users(), dup_items, interactions(), "src")


def test_interaction_ids_must_exist() -> None:
    orphan_item = interactions().assign(item_id=[10, 10, 20, 99])
    with pytest.raises(
        SchemaError, match=r"interactions\.parquet: column 'item_id' has 1 rows.*\[99\]"
    ):
        Dataset.from_frames(users(), items(), orphan_item, "src")
    orphan_user = interactions().assign(user_id=[1, 2, 7, 1])
    with pytest.raises(SchemaError, match=r"interactions\.parquet: column 'user_id'.*\[7\]"):
        Dataset.from_frames(users(), items(), orphan_user, "src")


def test_unknown_event_type_is_named():
    import pandas as pd
    import pytest

    from training.schema import Dataset, SchemaError

    users = pd.DataFrame(
        {"user_id": [1], "gender": ["F"], "age_bucket": ["18-24"], "activity": ["low"]}
    )
    items = pd.DataFrame(
        {"item_id": [2], "genre": ["drama"], "provider": ["indie"], "release_ts": [0]}
    )
    inter = pd.DataFrame(
        {"user_id": [1], "item_id": [2], "timestamp": [5], "event_type": ["play"], "value": [1.0]}
    )
    with pytest.raises(SchemaError, match="event_type"):
        Dataset.from_frames(users, items, inter)
