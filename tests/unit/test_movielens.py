"""MovieLens loading, on hand-written files in the three on-disk formats."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from training.movielens import ML100K_GENRES, detect_format, load_movielens
from training.schema import SchemaError

T0 = 881_250_949  # a real ML-100K timestamp (1997-12-04)


def jan1(year: int) -> int:
    return calendar.timegm((year, 1, 1, 0, 0, 0))


def flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


def write(path: Path, lines: list[str], encoding: str = "latin-1") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def ml100k(root: Path) -> Path:
    write(root / "u.data", [
        f"1\t10\t5\t{T0}",
        f"1\t20\t3\t{T0 + 10}",
        f"2\t10\t4\t{T0 + 20}",
        f"3\t30\t1\t{T0 + 30}",
        f"3\t10\t2\t{T0 + 40}",
    ])  # fmt: skip
    write(root / "u.user", [
        "1|24|M|technician|85711",
        "2|53|F|other|94043",
        "3|16|M|student|55105",
    ])  # fmt: skip
    write(root / "u.item", [
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{flags('Animation', 'Comedy')}",
        # Release date after its first rating: the rating wins.
        f"20|Café Society (1999)|01-Jan-1999||http://x|{flags('Drama')}",
        f"30|No Date|||http://x|{flags()}",
        f"40|Never Rated (1980)|||http://x|{flags('War', 'Action')}",
    ])  # fmt: skip
    return root


def ml1m(root: Path) -> Path:
    write(root / "ratings.dat", [
        f"1::1::5::{T0}",
        f"1::2::3::{T0 + 5}",
        f"2::1::4::{T0 + 7}",
        f"2::3::2::{T0 + 9}",
    ])  # fmt: skip
    write(root / "users.dat", ["1::F::1::10::48067", "2::M::56::12::70072"])
    write(root / "movies.dat", [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Jumanji (1995)::Adventure|Children's|Fantasy",
        "3::Señorita (1980)::Drama",
    ])  # fmt: skip
    return root


def csv_release(root: Path) -> Path:
    write(root / "ratings.csv", [
        "userId,movieId,rating,timestamp",
        f"7,1,4.0,{T0}",
        f"7,2,3.5,{T0 + 1}",
        f"9,1,0.5,{T0 + 2}",
    ], encoding="utf-8")  # fmt: skip
    write(root / "movies.csv", [
        "movieId,title,genres",
        '1,"American President, The (1995)",Comedy|Drama|Romance',
        "2,Untitled Thing,(no genres listed)",
    ], encoding="utf-8")  # fmt: skip
    return root


def test_ml100k_keeps_attributes(tmp_path: Path) -> None:
    ds = load_movielens(ml100k(tmp_path))
    assert detect_format(tmp_path) == "ml-100k"
    users = ds.users.set_index("user_id")
    assert users.loc[1, "gender"] == "M" and users.loc[1, "age_bucket"] == "18-24"
    assert users.loc[2, "age_bucket"] == "45-54" and users.loc[3, "age_bucket"] == "<18"
    assert users.loc[1, "occupation"] == "technician"
    items = ds.items.set_index("item_id")
    assert items.loc[10, "genre"] == "Animation"  # the first listed genre
    assert items.loc[40, "genre"] == "Action"  # first in the file's genre order
    assert items.loc[30, "genre"] == "unknown"
    assert items.loc[10, "release_ts"] == jan1(1995)
    assert items.loc[20, "release_ts"] == T0 + 10  # 1999 date is after the first rating
    assert items.loc[30, "release_ts"] == T0 + 30  # no date, no year: first rating
    assert items.loc[40, "release_ts"] == jan1(1980)  # never rated: the title's year
    x = ds.interactions
    assert set(x["event_type"]) == {"rating"}
    assert x.loc[x["item_id"] == 30, "value"].tolist() == [1.0]
    assert len(x) == 5


def test_ml1m_maps_codes(tmp_path: Path) -> None:
    ds = load_movielens(ml1m(tmp_path))
    assert detect_format(tmp_path) == "ml-1m"
    users = ds.users.set_index("user_id")
    assert users.loc[1, "gender"] == "F" and users.loc[1, "age_bucket"] == "<18"
    assert users.loc[1, "occupation"] == "K-12 student"
    assert users.loc[2, "age_bucket"] == "55+" and users.loc[2, "occupation"] == "programmer"
    items = ds.items.set_index("item_id")
    assert items.loc[1, "genre"] == "Animation" and items.loc[2, "genre"] == "Adventure"
    assert items.loc[1, "release_ts"] == jan1(1995)
    assert items.loc[3, "release_ts"] == jan1(1980)
    # Provider: top 20% by rating count (1 of 3 items, rounded up) is "major".
    assert items["provider"].tolist() == ["major", "indie", "indie"]
    assert set(ds.users["activity"]) <= {"low", "medium", "high"}


def test_csv_release_has_unknown_user_attributes(tmp_path: Path) -> None:
    ds = load_movielens(csv_release(tmp_path))
    assert detect_format(tmp_path) == "csv"
    assert ds.users["user_id"].tolist() == [7, 9]
    assert set(ds.users["gender"]) == {"unknown"} and set(ds.users["age_bucket"]) == {"unknown"}
    items = ds.items.set_index("item_id")
    assert items.loc[1, "genre"] == "Comedy" and items.loc[2, "genre"] == "unknown"
    assert items.loc[1, "release_ts"] == jan1(1995)
    assert items.loc[2, "release_ts"] == T0 + 1
    assert sorted(ds.interactions["value"].tolist()) == [0.5, 3.5, 4.0]
    # Heavier users are never in a lower activity bucket than lighter ones.
    activity = ds.users.set_index("user_id")["activity"]
    assert (activity[7], activity[9]) in {("high", "low"), ("medium", "low"), ("high", "medium")}


def test_a_file_path_means_its_folder(tmp_path: Path) -> None:
    ds = load_movielens(ml1m(tmp_path) / "ratings.dat")
    assert len(ds.interactions) == 4


def test_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    ml100k(tmp_path)
    write(tmp_path / "u.data", [f"1\t10\t5\t{T0}", "1\t20\t3"])
    with pytest.raises(SchemaError, match=r"u\.data: line 2 has 3 fields.*expected 4"):
        load_movielens(tmp_path)


def test_non_integer_id_names_file_and_field(tmp_path: Path) -> None:
    ml1m(tmp_path)
    write(tmp_path / "ratings.dat", [f"1::1::5::{T0}", f"abc::2::3::{T0}"])
    with pytest.raises(SchemaError, match=r"ratings\.dat: line 2, field 'user_id' is 'abc'"):
        load_movielens(tmp_path)


def test_non_integer_id_in_csv(tmp_path: Path) -> None:
    csv_release(tmp_path)
    write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp", f"7,1.5,4.0,{T0}"])
    with pytest.raises(SchemaError, match=r"ratings\.csv: row 1 after the header, field 'movieId'"):
        load_movielens(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    csv_release(tmp_path)
    (tmp_path / "movies.csv").write_text("")
    with pytest.raises(SchemaError, match=r"movies\.csv: the file is empty"):
        load_movielens(tmp_path)
    (tmp_path / "k").mkdir()
    ml100k(tmp_path / "k")
    (tmp_path / "k" / "u.user").write_text("\n")
    with pytest.raises(SchemaError, match=r"u\.user: the file is empty"):
        load_movielens(tmp_path / "k")


def test_missing_file(tmp_path: Path) -> None:
    ml100k(tmp_path)
    (tmp_path / "u.item").unlink()
    with pytest.raises(SchemaError, match=r"u\.item: file not found"):
        load_movielens(tmp_path)


def test_missing_ratings_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="no MovieLens ratings file"):
        load_movielens(tmp_path)
    with pytest.raises(SchemaError, match="folder not found"):
        load_movielens(tmp_path / "nope")


def test_missing_csv_column(tmp_path: Path) -> None:
    csv_release(tmp_path)
    write(tmp_path / "ratings.csv", ["userId,movieId,timestamp", f"7,1,{T0}"])
    with pytest.raises(SchemaError, match=r"ratings\.csv: missing column 'rating'"):
        load_movielens(tmp_path)


def test_bad_age_code(tmp_path: Path) -> None:
    ml1m(tmp_path)
    write(tmp_path / "users.dat", ["1::F::1::10::48067", "2::M::99::12::70072"])
    with pytest.raises(SchemaError, match=r"users\.dat: line 2, field 'age' is 99"):
        load_movielens(tmp_path)


def test_rating_for_unknown_movie(tmp_path: Path) -> None:
    ml1m(tmp_path)
    write(tmp_path / "ratings.dat", [f"1::1::5::{T0}", f"1::999::3::{T0}"])
    with pytest.raises(SchemaError, match=r"ratings\.dat: field 'item_id'.*\[999\]"):
        load_movielens(tmp_path)


def test_written_ml100k_files_import_back_to_the_same_tables(tmp_path):
    from training.movielens_write import write_ml100k
    from training.synth import SynthConfig, generate_dataset

    _world, ds = generate_dataset(SynthConfig.preset("tiny"), progress=False)
    back = load_movielens(write_ml100k(ds, tmp_path / "ml"))
    assert detect_format(tmp_path / "ml") == "ml-100k"
    assert set(back.users["user_id"]) == set(ds.users["user_id"])
    assert set(back.items["item_id"]) == set(ds.items["item_id"])
    cols = ["user_id", "item_id", "timestamp"]
    key = sorted(map(tuple, ds.interactions[cols].to_numpy().tolist()))
    assert sorted(map(tuple, back.interactions[cols].to_numpy().tolist())) == key
    assert back.interactions["value"].between(1, 5).all()
    # One genre flag per item, so items of one synthetic genre share one MovieLens genre.
    pairs = ds.items[["item_id", "genre"]].merge(back.items[["item_id", "genre"]], on="item_id")
    assert (pairs.groupby("genre_x")["genre_y"].nunique() == 1).all()
    assert back.users.set_index("user_id").loc[ds.users["user_id"], "gender"].tolist() == [
        "F" if g == "F" else "M" for g in ds.users["gender"]
    ]
