"""Atomic file and directory writes (a temp path beside the target, renamed into place only when complete, under a
lock that one writer of an output holds at a time), TOML and JSON files read and written the one way dcnc does it,
and content hashes of files and folders.

Temporary siblings are named `.<name prefix>~<hash of the name>.XXXXXXXX.tmp`: short whatever the output's name
(a 250-byte name must still leave room for them), and found again by the next writer of the same output, which
removes what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
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

NAME_BYTES = 255  # the longest file name Linux and macOS filesystems take
PREFIX_BYTES = 40  # of the output's name kept in its temporary siblings' names
LEFTOVER_SUFFIXES = (".tmp", ".old")  # what a killed writer leaves (its lock file is reused)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_all(path: Path, data: bytes) -> None:
    """The one place dcnc's output bytes reach the disk (always a temporary path inside an atomic write). Tests
    replace it with a failing writer to play a full disk."""
    with open(path, "wb") as handle:
        handle.write(data)


# --- temporary siblings and the writer's lock ------------------------------------------------------------------
def sibling_prefix(path: Path) -> str:
    """`.<first bytes of the name>~<12 hex of its sha256>.`: the start of every temporary sibling of `path`."""
    name = path.name.encode()
    digest = hashlib.sha256(name).hexdigest()[:12]
    short = name[:PREFIX_BYTES].decode(errors="ignore")  # cut on a character boundary
    return f".{short}~{digest}."


def leftovers(path: Path) -> list[Path]:
    """Temporary siblings of `path` (files or folders) that a writer left behind."""
    prefix = sibling_prefix(path)
    if not path.parent.is_dir():
        return []
    return sorted(
        p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(LEFTOVER_SUFFIXES)
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold the lock on output `path` (flock on `.<prefix>lock` beside it; the kernel drops it when a process dies),
    then remove the temporary siblings a killed writer left. A second writer of the same output fails at once."""
    if path.name in ("", ".", ".."):
        raise DcncError(f"{path}: not a name an output can have (give a file or folder name)")
    lock = path.parent / (sibling_prefix(path) + "lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    except OSError as err:
        raise DcncError(f"{path}: cannot be written ({err.strerror})") from None
    busy = f"{path}: another dcnc process is writing it; wait for it to finish"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise DcncError(busy) from None
        except OSError:  # a filesystem without locks (some network mounts): write unlocked, keep what is there
            locked = False
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder before us removed the file we opened: a newer writer may hold the new one
            raise DcncError(busy)
        for leftover in leftovers(path) if locked else ():
            _remove(leftover)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def user_paths(tmp: Path, path: Path, output: Path | None = None) -> Iterator[None]:
    """Errors inside an atomic write name the user's paths, not their temporary stand-ins: a DcncError's text has
    `tmp` replaced by `path`, and a filesystem error (full disk, read-only, permissions) becomes one line saying
    that `output` (default `path`) was not written."""
    output = output or path
    try:
        yield
    except DcncError as err:
        text = str(err)
        if str(tmp) not in text:
            raise
        replaced = copy.copy(err)  # same type and fields, the user's path in its text
        replaced.args = (text.replace(str(tmp), str(path)), *err.args[1:])
        raise replaced from None
    except OSError as err:
        where = str(err.filename).replace(str(tmp), str(path)) if err.filename else None
        detail = err.strerror or str(err)
        at = f" at {where}" if where and where != str(output) else ""
        raise DcncError(f"{output}: not written ({detail}{at})") from None


@contextlib.contextmanager
def _parent_made(path: Path) -> Iterator[None]:
    """Create the folders above `path` that are missing; if the write fails they are removed again (innermost
    first, and only while empty: one that holds something is someone else's now)."""
    missing = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing:
        try:
            path.parent.mkdir(parents=True)
        except OSError as err:
            raise DcncError(f"{path}: cannot create its folder ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DcncError(f"{path}: folder {path.parent} is not writable")
    try:
        yield
    except BaseException:
        for made in missing:
            try:
                made.rmdir()
            except OSError:
                break
        raise


# --- atomic writes ---------------------------------------------------------------------------------------------
def _sibling(path: Path, suffix: str, folder: bool = True) -> Path:
    """A new temporary sibling of `path`: an empty folder, or an empty file."""
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=sibling_prefix(path), suffix=suffix, dir=path.parent))
        fd, name = tempfile.mkstemp(prefix=sibling_prefix(path), suffix=suffix, dir=path.parent)
        os.close(fd)
        return Path(name)
    except OSError as err:
        raise DcncError(f"{path}: not written ({err.strerror})") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    with _parent_made(path), output_lock(path):
        tmp_path = _sibling(path, ".tmp", folder=False)
        try:
            with user_paths(tmp_path, path):
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
    with _parent_made(path), output_lock(path):
        tmp = _sibling(path, ".tmp")
        try:
            with user_paths(tmp, path):
                tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private
                yield tmp
                _put_in_place(tmp, path, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _put_in_place(tmp: Path, path: Path, force: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    if not force:  # someone made it while we worked (without dcnc's lock): theirs stays
        raise DcncError(f"{path}: appeared while this command ran (pass --force to replace it)")
    old = _sibling(path, ".old")
    try:
        os.replace(path, old / "x")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path` for one file and the side files it names (an ONNX and its external
    data); on success they move beside `path`, the file named `path.name` last, so it never points at missing data."""
    path = Path(path)
    with _parent_made(path), output_lock(path):
        tmp = _sibling(path, ".tmp")
        try:
            with user_paths(tmp, path.parent, output=path), user_paths(tmp / path.name, path):
                yield tmp
                for item in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
                    os.replace(item, path.parent / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        write_all(tmp, data)


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
    return _read_text(path, what, tomllib.loads, tomllib.TOMLDecodeError, "TOML")


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in the file at `path`, or DcncError in one line naming it as `what` ("baseline report")."""
    return _read_text(path, what, json.loads, json.JSONDecodeError, "JSON")


def _read_text(path: str | Path, what: str, parse, error: type[Exception], kind: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DcncError(f"{path}: no such {what}")
    try:
        return parse(path.read_text())
    except (error, UnicodeDecodeError) as err:
        raise DcncError(f"{path}: not valid {kind} ({err})") from None


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """`data` as indented JSON (json_safe), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_weights(array) -> str:
    """Hash of a weight tensor's shape and float32 values (a numpy array): the same in a torch module and in the
    ONNX initializer exported from it."""
    import numpy as np

    values = np.ascontiguousarray(array, dtype="<f4")
    return hashlib.sha256(repr(values.shape).encode() + values.tobytes()).hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of a directory's files (relative names and contents, in sorted order)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()
