"""MovieLens-100K reader: both file layouts, the features built from them, and one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit.core.errors import DcncError
from toolkit.example.data import load_dataset
from toolkit.example.data.movielens import GENRES, load_movielens, recbole_copy

RATINGS = ["1\t10\t5\t881250949", "1\t20\t3\t881250950", "2\t10\t4\t881250951", "3\t30\t1\t881250952"]
USERS = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|17|M|student|T8H1N"]


def item_line(item_id: int, date: str, genres: list[str]) -> str:
    flags = ["1" if g in genres else "0" for g in GENRES]
    return "|".join([str(item_id), f"Movie {item_id} (1995)", date, "", "http://example"] + flags)


def write_grouplens(folder: Path, ratings: list[str] = RATINGS, users: list[str] = USERS) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "u.data").write_text("\n".join(ratings) + "\n")
    items = [item_line(10, "01-Jan-1995", ["Comedy", "Drama"]), item_line(20, "", ["unknown"]),
             item_line(30, "01-Jan-1980", ["Sci-Fi"])]  # fmt: skip
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    (folder / "u.user").write_text("\n".join(users) + "\n")
    return folder


def write_recbole(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "\n".join(RATINGS) + "\n"
    )  # fmt: skip
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tMovie 10\t1995\tComedy Drama\n20\tMovie 20\tunkonwn\tunknown\n30\tMovie 30\t1980\tSci-Fi\n"
    )
    (folder / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "\n".join(line.replace("|", "\t") for line in USERS) + "\n"
    )  # fmt: skip
    return folder


def test_grouplens_folder_gives_rows_sorted_by_movielens_id(tmp_path):
    data = load_movielens(write_grouplens(tmp_path / "ml"))
    assert (data.num_users, data.num_items, data.num_interactions) == (3, 3, 4)
    assert data.user.tolist() == [0, 0, 1, 2] and data.item.tolist() == [0, 1, 0, 2]
    assert data.rating.tolist() == [5, 3, 4, 1]


def test_user_features_bucket_age_index_occupation_and_encode_gender_and_zip(tmp_path):
    data = load_movielens(write_grouplens(tmp_path / "ml"))
    assert data.user_features["user_age"].tolist() == [1, 5, 0]  # 24 -> 18-24, 53 -> 50-55, 17 -> <18
    assert data.user_features["user_occupation"].tolist() == [19, 13, 18]  # technician, other, student
    profile = data.user_features["user_profile"]
    assert profile.shape == (3, 12)
    assert profile[:, 0].tolist() == [0.0, 1.0, 0.0]  # is_female
    assert profile[0, 2 + 8] == 1.0 and profile[2, 2:].sum() == 0.0  # zip 8xxxx; a Canadian zip has no region


def test_item_features_take_the_first_genre_and_flag_all_genres(tmp_path):
    data = load_movielens(write_grouplens(tmp_path / "ml"))
    assert data.item_features["item_genre"].tolist() == [GENRES.index("Comedy"), 0, GENRES.index("Sci-Fi")]
    profile = data.item_features["item_profile"]
    assert profile.shape == (3, 20)
    assert profile[0, :19].sum() == 2.0 and profile[0, 19] == pytest.approx(0.5)  # (1995 - 1990) / 10
    assert profile[1, 19] == 0.0  # no release date


def test_recbole_atomic_files_give_the_same_dataset_as_grouplens_files(tmp_path):
    grouplens = load_movielens(write_grouplens(tmp_path / "a"))
    recbole = load_movielens(write_recbole(tmp_path / "b"))
    for table in ("user_features", "item_features"):
        for name, array in getattr(grouplens, table).items():
            assert np.array_equal(array, getattr(recbole, table)[name]), name
    assert np.array_equal(grouplens.rating, recbole.rating) and np.array_equal(grouplens.item, recbole.item)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DcncError, match="MovieLens folder not found"):
        load_movielens(tmp_path / "absent")


def test_folder_without_the_files_names_what_it_expected(tmp_path):
    with pytest.raises(DcncError, match="expected u.data, u.item, u.user"):
        load_movielens(tmp_path)


def test_line_with_too_few_fields_is_named_by_file_and_line(tmp_path):
    folder = write_grouplens(tmp_path / "ml", ratings=RATINGS[:2] + ["2\t10\t4"])
    with pytest.raises(DcncError, match=r"u.data line 3: expected 4"):
        load_movielens(folder)


def test_non_numeric_rating_is_refused(tmp_path):
    folder = write_grouplens(tmp_path / "ml", ratings=["1\t10\tfive\t881250949"])
    with pytest.raises(DcncError, match=r"u.data line 1: rating 'five' is not a number"):
        load_movielens(folder)


def test_rating_outside_one_to_five_is_refused(tmp_path):
    folder = write_grouplens(tmp_path / "ml", ratings=["1\t10\t7\t881250949"])
    with pytest.raises(DcncError, match="rating 7.0 is outside 1..5"):
        load_movielens(folder)


def test_rating_of_an_item_missing_from_u_item_is_refused(tmp_path):
    folder = write_grouplens(tmp_path / "ml", ratings=["1\t99\t4\t881250949"])
    with pytest.raises(DcncError, match="item 99, which is not in the item file"):
        load_movielens(folder)


def test_unknown_occupation_is_refused(tmp_path):
    folder = write_grouplens(tmp_path / "ml", users=["1|24|M|astronaut|85711", *USERS[1:]])
    with pytest.raises(DcncError, match="u.user line 1: unknown occupation 'astronaut'"):
        load_movielens(folder)


def test_load_dataset_reads_movielens_from_data_dir(tmp_path):
    assert load_dataset("movielens", write_grouplens(tmp_path / "ml")).name == "movielens"


@pytest.mark.skipif(recbole_copy() is None, reason="recbole is not installed (pip install --no-deps recbole==1.2.1)")
def test_recbole_package_copy_is_the_full_movielens_100k():
    data = load_movielens()
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100_000)
    assert data.cardinalities["user_occupation"] == 21 and data.cardinalities["item_genre"] == 19


def test_without_data_dir_or_recbole_the_error_says_how_to_get_the_data(monkeypatch):
    monkeypatch.setattr("toolkit.example.data.movielens.recbole_copy", lambda: None)
    with pytest.raises(DcncError, match="pass --data-dir DIR holding u.data"):
        load_movielens()
