"""MovieLens-100K reader: the GroupLens folder (u.data, u.item, u.user) or RecBole's atomic files
(ml-100k.inter/.item/.user, shipped inside the recbole package) -> Interactions with dcnc's feature names.

Features built from the files:
- user_age: 7 MovieLens-1M age buckets; user_occupation: index in the 21 occupations of u.occupation;
  user_profile: [is_female, age / 50, one-hot of the zip code's first digit (10)] = 12 floats.
- item_genre: the first of the movie's genres (19, "unknown" first); item_profile: the 19 genre flags and
  (release year - 1990) / 10 (0 when unknown) = 20 floats.
Ids are rows of the tables: users and items sorted by their MovieLens id.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolkit.core.errors import DcncError
from toolkit.example.data.interactions import Interactions

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
GROUPLENS_FILES = ("u.data", "u.item", "u.user")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")


def recbole_copy() -> Path | None:
    """The ml-100k folder inside an installed recbole package (found without importing recbole), or None."""
    found = importlib.util.find_spec("recbole")
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        folder = Path(location) / "dataset_example" / "ml-100k"
        if all((folder / name).is_file() for name in RECBOLE_FILES):
            return folder
    return None


def load_movielens(data_dir: str | Path | None = None) -> Interactions:
    """Read MovieLens-100K from `data_dir` (either layout), or from recbole's copy when data_dir is None."""
    if data_dir is None:
        folder = recbole_copy()
        if folder is None:
            raise DcncError(
                "MovieLens-100K: pass --data-dir DIR holding u.data, u.item, u.user (the ml-100k folder from"
                " grouplens.org), or `pip install --no-deps recbole==1.2.1`, which ships a copy"
            )
    else:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DcncError(f"{folder}: MovieLens folder not found")
    if all((folder / name).is_file() for name in GROUPLENS_FILES):
        ratings = _grouplens_ratings(folder / "u.data")
        items = _grouplens_items(folder / "u.item")
        users = _grouplens_users(folder / "u.user")
    elif all((folder / name).is_file() for name in RECBOLE_FILES):
        ratings = _recbole_ratings(folder / "ml-100k.inter")
        items = _recbole_items(folder / "ml-100k.item")
        users = _recbole_users(folder / "ml-100k.user")
    else:
        raise DcncError(
            f"{folder}: no MovieLens-100K files; expected {', '.join(GROUPLENS_FILES)}"
            f" or RecBole's {', '.join(RECBOLE_FILES)}"
        )
    return _interactions(folder, ratings, items, users)


# Raw records: ratings (user, item, rating, timestamp); items id -> (year or None, genre indices);
# users id -> (age, gender, occupation, zip code).
Rating = tuple[int, int, float, int]
Item = tuple[float | None, list[int]]
User = tuple[int, str, str, str]


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-empty lines; u.item is latin-1, so decode errors are replaced, not fatal."""
    with open(path, encoding=encoding, errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _fields(path: Path, number: int, line: str, sep: str, count: int, names: str) -> list[str]:
    fields = line.split(sep)
    if len(fields) < count:
        raise DcncError(f"{path} line {number}: expected {count} {sep!r}-separated fields ({names}), got {len(fields)}")
    return fields


def _number(path: Path, number: int, text: str, what: str, kind: type = int) -> int | float:
    """A float, or with kind=int an integral number (RecBole writes typed columns like `881250949` or `3.0`)."""
    try:
        value = float(text)
    except ValueError:
        raise DcncError(f"{path} line {number}: {what} {text!r} is not a number") from None
    if not np.isfinite(value) or (kind is int and not value.is_integer()):
        raise DcncError(f"{path} line {number}: {what} {text!r} is not {'an integer' if kind is int else 'finite'}")
    return int(value) if kind is int else value


def _rating(path: Path, number: int, fields: list[str]) -> Rating:
    rating = _number(path, number, fields[2], "rating", float)
    if not 1 <= rating <= 5:
        raise DcncError(f"{path} line {number}: rating {rating} is outside 1..5")
    return (
        _number(path, number, fields[0], "user id"),
        _number(path, number, fields[1], "item id"),
        rating,
        _number(path, number, fields[3], "timestamp"),
    )


def _grouplens_ratings(path: Path) -> list[Rating]:
    names = "user id, item id, rating, timestamp"
    return [_rating(path, n, _fields(path, n, line, "\t", 4, names)) for n, line in _lines(path)]


def _grouplens_items(path: Path) -> dict[int, Item]:
    items = {}
    for n, line in _lines(path, encoding="latin-1"):
        fields = _fields(path, n, line, "|", 5 + len(GENRES), "id|title|release date|video date|url|19 genre flags")
        flags = fields[5 : 5 + len(GENRES)]
        if any(flag not in ("0", "1") for flag in flags):
            raise DcncError(f"{path} line {n}: genre flags must be 0 or 1, got {'|'.join(flags)}")
        date = fields[2].strip()
        year = float(date[-4:]) if date[-4:].isdigit() else None
        items[_number(path, n, fields[0], "item id")] = (year, [g for g, flag in enumerate(flags) if flag == "1"])
    return items


def _grouplens_users(path: Path) -> dict[int, User]:
    users = {}
    for n, line in _lines(path):
        fields = _fields(path, n, line, "|", 5, "id|age|gender|occupation|zip code")
        users[_number(path, n, fields[0], "user id")] = _user(path, n, *fields[1:5])
    return users


def _user(path: Path, number: int, age: str, gender: str, occupation: str, zip_code: str) -> User:
    if gender not in ("M", "F"):
        raise DcncError(f"{path} line {number}: gender must be M or F, got {gender!r}")
    if occupation not in OCCUPATIONS:
        raise DcncError(f"{path} line {number}: unknown occupation {occupation!r}")
    return (_number(path, number, age, "age"), gender, occupation, zip_code)


def _atomic(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """RecBole atomic file: a `name:type` header, then tab-separated rows; yields the named columns of each row."""
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise DcncError(f"{path}: empty file")
    header = [field.split(":")[0] for field in first[1].split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DcncError(f"{path} line 1: header lacks column(s) {missing}")
    where = [header.index(c) for c in columns]
    for n, line in lines:
        fields = _fields(path, n, line, "\t", len(header), ", ".join(header))
        yield n, [fields[i] for i in where]


def _recbole_ratings(path: Path) -> list[Rating]:
    return [_rating(path, n, f) for n, f in _atomic(path, ("user_id", "item_id", "rating", "timestamp"))]


def _recbole_items(path: Path) -> dict[int, Item]:
    items = {}
    for n, (item_id, year, genres) in _atomic(path, ("item_id", "release_year", "class")):
        unknown = [g for g in genres.split() if g not in GENRES]
        if unknown:
            raise DcncError(f"{path} line {n}: unknown genre(s) {unknown}")
        codes = sorted(GENRES.index(g) for g in genres.split())
        items[_number(path, n, item_id, "item id")] = (float(year) if year.isdigit() else None, codes)
    return items


def _recbole_users(path: Path) -> dict[int, User]:
    return {
        _number(path, n, f[0], "user id"): _user(path, n, *f[1:])
        for n, f in _atomic(path, ("user_id", "age", "gender", "occupation", "zip_code"))
    }


def _interactions(folder: Path, ratings: list[Rating], items: dict[int, Item], users: dict[int, User]) -> Interactions:
    if not ratings:
        raise DcncError(f"{folder}: the ratings file has no rows")
    user_row = {raw: row for row, raw in enumerate(sorted(users))}
    item_row = {raw: row for row, raw in enumerate(sorted(items))}
    for user, item, _, _ in ratings:
        if user not in user_row:
            raise DcncError(f"{folder}: a rating names user {user}, who is not in the user file")
        if item not in item_row:
            raise DcncError(f"{folder}: a rating names item {item}, which is not in the item file")

    user_age, user_occupation, user_profile = [], [], []
    for raw in sorted(users):
        age, gender, occupation, zip_code = users[raw]
        region = np.zeros(10, np.float32)
        if zip_code[:1].isdigit():
            region[int(zip_code[0])] = 1.0
        user_age.append(int(np.searchsorted(AGE_EDGES, age, side="right")))
        user_occupation.append(OCCUPATIONS.index(occupation))
        user_profile.append(np.concatenate([[gender == "F", age / 50.0], region]))
    item_genre, item_profile = [], []
    for raw in sorted(items):
        year, genres = items[raw]
        flags = np.zeros(len(GENRES), np.float32)
        flags[genres] = 1.0
        item_genre.append(genres[0] if genres else 0)
        item_profile.append(np.concatenate([flags, [(year - 1990.0) / 10.0 if year is not None else 0.0]]))

    table = np.array(ratings, dtype=np.float64)
    return Interactions(
        name="movielens",
        user_features={
            "user_id": np.arange(len(users), dtype=np.int64),
            "user_age": np.array(user_age, np.int64),
            "user_occupation": np.array(user_occupation, np.int64),
            "user_profile": np.array(user_profile, np.float32),
        },
        item_features={
            "item_id": np.arange(len(items), dtype=np.int64),
            "item_genre": np.array(item_genre, np.int64),
            "item_profile": np.array(item_profile, np.float32),
        },
        user=np.array([user_row[int(u)] for u in table[:, 0]], np.int64),
        item=np.array([item_row[int(i)] for i in table[:, 1]], np.int64),
        rating=table[:, 2].astype(np.float32),
        timestamp=table[:, 3].astype(np.int64),
        cardinalities={
            "user_id": len(users),
            "user_age": len(AGE_EDGES) + 1,
            "user_occupation": len(OCCUPATIONS),
            "item_id": len(items),
            "item_genre": len(GENRES),
        },
    ).check()
