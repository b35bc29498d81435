"""Writing exported ONNX: one self-contained file (tensors in `<name>.data` beside it only above protobuf's 2 GB),
or a directory of towers, staged so that a failed export leaves nothing behind, not even the folders made for it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_dir, atomic_path, atomic_write_bytes

EXTERNAL_DATA_THRESHOLD = 2**31 - 1  # protobuf cannot serialise one message above 2 GB


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """One self-contained file; above 2 GB the tensors go to `<name>.data` beside it (protobuf's limit)."""
    if model.ByteSize() <= EXTERNAL_DATA_THRESHOLD:
        atomic_write_bytes(path, model.SerializeToString(deterministic=True))
        return
    data = path.parent / f"{path.name}.data"
    try:
        with atomic_path(path) as tmp:
            onnx.save_model(
                model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
            )
    except BaseException:
        data.unlink(missing_ok=True)
        raise


def check_output(out: Path, several: bool, force: bool) -> None:
    """Refuse, before any work, an output that exists (without force), has the wrong form, or cannot be written."""
    if several and out.suffix == ".onnx":
        raise DcncError(f"-o {out}: this model has several towers; give a directory (one <tower>.onnx each)")
    if not several and out.suffix != ".onnx":
        raise DcncError(f"-o {out}: give the .onnx file to write (this export has one tower)")
    if out.exists() or out.is_symlink():
        if not force:
            raise DcncError(f"{out}: already exists (pass --force to replace it)")
        if not several and out.is_dir():
            raise DcncError(f"{out}: is a directory; give the .onnx file to write")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DcncError(f"{out}: cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DcncError(f"{out}: cannot be written: {ancestor} is not writable")


@contextlib.contextmanager
def staged(out: Path, several: bool, force: bool) -> Iterator[Path]:
    """A folder to write into; on success its content takes the place of `out` (a directory, or one file and
    its external data), on failure it is removed with everything in it, and so are the folders made for `out`."""
    created = missing_folders(out.parent)
    try:
        if several:
            with atomic_dir(out, force=force) as folder:
                yield folder
            return
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        except OSError as err:
            raise DcncError(f"{out}: cannot be written ({err.strerror})") from None
        try:
            yield folder
            for item in sorted(folder.iterdir(), key=lambda p: p.name == out.name):  # data file first, model last
                os.replace(item, out.parent / item.name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except BaseException:
        for made in reversed(created):  # innermost first; one that is not empty is someone else's now
            try:
                made.rmdir()
            except OSError:
                break
        raise


def missing_folders(folder: Path) -> list[Path]:
    """The folders above a path that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]
