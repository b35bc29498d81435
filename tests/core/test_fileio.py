"""Atomic writes: whole files or nothing, with the permissions any file the user writes gets."""

from __future__ import annotations

import os
import stat

import pytest

from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_dir, atomic_path, atomic_write_text, umask


def test_written_file_gets_the_umask_permissions_not_the_temp_files_private_ones(tmp_path):
    atomic_write_text(tmp_path / "report.json", "{}")
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask()


def test_written_directory_gets_the_umask_permissions(tmp_path):
    with atomic_dir(tmp_path / "bundle") as folder:
        (folder / "manifest.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~umask()


def test_failed_write_leaves_neither_the_file_nor_a_temp_file(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("export failed")
    assert os.listdir(tmp_path) == []


def test_existing_directory_is_kept_without_force(tmp_path):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(DcncError, match="already exists"), atomic_dir(tmp_path / "bundle"):
        pass
    assert os.listdir(tmp_path) == ["bundle"]
