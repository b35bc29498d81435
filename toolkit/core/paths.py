"""Path safety: every path a bundle or pipeline names stays inside its folder (`contained`), and every output a
command names is checked before any work (`check_outputs`): never an input, never around or inside one, never
the folder dcnc runs in, and writable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from toolkit.core.errors import DcncError
from toolkit.core.fileio import NAME_BYTES


def contained(root: str | Path, name: object, where: str) -> Path:
    """`root / name` for a relative `name` that resolves inside `root` (through `..` or symlinks alike); DcncError
    naming `where` (the file that names it) for an absolute, empty, escaping or non-string path."""
    root = Path(root)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise DcncError(f"{where}: names the path {name!r}, which is not a relative file name")
    if Path(name).is_absolute():
        raise DcncError(f"{where}: names the absolute path {name!r}; paths it names must stay inside {root}")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()) or path.resolve() == root.resolve():
        raise DcncError(f"{where}: names {name!r}, which resolves outside {root}; paths it names must stay inside it")
    return path


# --- outputs ----------------------------------------------------------------------------------------------------
FILE, DIR, FOLDER = "file", "dir", "folder"


@dataclass(frozen=True)
class Output:
    """One output a command writes. kind: FILE or DIR, replaced as a whole (`replace`: an existing one may be
    replaced, i.e. --force or a report file); FOLDER, a folder the command writes its files into (kept if it
    exists). option: how the command line names it, for messages (e.g. "-o", "--report")."""

    path: Path
    option: str
    kind: str = FILE
    replace: bool = False


def output(path: str | Path | None, option: str, kind: str = FILE, replace: bool = False) -> Output | None:
    """An Output, or None for an option not given."""
    return None if path is None else Output(Path(path), option, kind, replace)


def check_outputs(outputs: Iterable[Output | None], inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, in one line: an output that is, contains or lies inside one of `inputs` (replacing
    it, or writing into it, would destroy or change what the command reads); the current folder or one above it;
    a dangling symlink; a name over 255 bytes; the wrong kind of thing where it exists (a folder for a file, a file
    for a folder); an existing output without leave to replace it; two outputs at one path; a place that cannot be
    written (the nearest existing folder above it is not a writable folder)."""
    given = [o for o in outputs if o is not None]
    sources = [Path(p) for p in inputs if p is not None and _is_path(p)]
    seen: dict[Path, Output] = {}
    for out in given:
        _check_one(out, sources)
        key = out.path.resolve()
        if key in seen:
            raise DcncError(f"{out.option} {out.path}: also given as {seen[key].option}; give each output its own path")
        seen[key] = out


def _is_path(ref: str | Path) -> bool:
    """False for references that are not files: package.module:factory and dataset:NAME."""
    text = str(ref)
    return Path(text).exists() or ":" not in text


def _check_one(out: Output, sources: list[Path]) -> None:
    path, label = out.path, f"{out.option} {out.path}"
    if out.kind != FOLDER and path.name in ("", ".", ".."):  # replaced as a whole: it needs a name of its own
        raise DcncError(f"{label}: give a file or folder name, not {str(path)!r}")
    if len(path.name.encode()) > NAME_BYTES:
        size = len(path.name.encode())
        raise DcncError(f"{label}: the name is {size} bytes long; files may have at most {NAME_BYTES}")
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        raise DcncError(f"{label}: is a symlink to {target}, which does not exist; remove it or give another path")
    resolved = path.resolve()
    if out.kind != FOLDER and Path.cwd().resolve().is_relative_to(resolved):
        raise DcncError(
            f"{label}: is the current folder or one above it; replacing it would remove the folder dcnc runs in"
        )
    for source in sources:
        _check_against_input(label, resolved, source)
    if path.exists():
        if out.kind == FILE and path.is_dir():
            raise DcncError(f"{label}: is a folder; give the file to write")
        if out.kind in (DIR, FOLDER) and not path.is_dir():
            raise DcncError(f"{label}: exists and is not a folder")
        if out.kind != FOLDER and not out.replace:
            raise DcncError(f"{label}: already exists (pass --force to replace it)")
    ancestor = path.parent if out.kind != FOLDER or not path.exists() else path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DcncError(f"{label}: cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DcncError(f"{label}: cannot be written: {ancestor} is not writable")


def _check_against_input(label: str, out: Path, source: Path) -> None:
    source = source.resolve()
    if out == source:
        raise DcncError(f"{label}: is an input of this command; write the output elsewhere")
    if source.is_relative_to(out):
        raise DcncError(f"{label}: holds the input {source}; write the output elsewhere")
    if source.is_dir() and out.is_relative_to(source):
        raise DcncError(f"{label}: lies inside the input folder {source}; write the output elsewhere")
