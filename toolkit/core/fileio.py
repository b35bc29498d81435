"""Atomic file and directory writes (a temp path beside the target, renamed into place only when complete), JSON
files written the one way dcnc writes them, and content hashes of files and folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.core.errors import DcncError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def _check_parent(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as err:
            raise DcncError(f"{path}: cannot create its folder ({err.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise DcncError(f"{path}: folder {parent} is not writable")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    _check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it private; an output is shared like any file the user writes
            tmp_path.chmod(0o666 & ~umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it takes the place of `path` (replacing it only with `force`)."""
    path = Path(path)
    if path.exists() and not force:
        raise DcncError(f"{path}: already exists (pass --force to replace it)")
    _check_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_safe(value: Any) -> Any:
    """A copy JSON can hold exactly: NaN and infinities become None (JSON has no NaN), tuples lists, paths and
    keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The TOML table in the file at `path`, or DcncError in one line naming it as `what` ("pipeline file")."""
    path = Path(path)
    if not path.is_file():
        raise DcncError(f"{path}: no such {what}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DcncError(f"{path}: not valid TOML ({err})") from None


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in the file at `path`, or DcncError in one line naming it as `what` ("baseline report")."""
    path = Path(path)
    if not path.is_file():
        raise DcncError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DcncError(f"{path}: not valid JSON ({err})") from None


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """`data` as indented JSON (json_safe), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of a directory's files (relative names and contents, in sorted order)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()
