"""Atomic writes: whole files or nothing, with the permissions any file the user writes gets."""

from __future__ import annotations

import os
import stat

import pytest

from toolkit.core.errors import DcncError
from toolkit.core.fileio import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    sibling_prefix,
    umask,
)


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


def test_temporary_siblings_of_a_long_name_stay_short(tmp_path):
    name = "n" * 250
    with atomic_dir(tmp_path / name) as folder:
        assert len(folder.name.encode()) < 80
        (folder / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_second_writer_of_one_output_fails_at_once(tmp_path):
    with atomic_dir(tmp_path / "bundle"), pytest.raises(DcncError, match="another dcnc process is writing it"):
        with atomic_dir(tmp_path / "bundle"):
            pass


def test_an_output_made_by_someone_else_meanwhile_is_kept_without_force(tmp_path):
    with pytest.raises(DcncError, match="appeared while this command ran"), atomic_dir(tmp_path / "bundle") as folder:
        (folder / "mine").write_text("")
        (tmp_path / "bundle").mkdir()
        (tmp_path / "bundle" / "theirs").write_text("")
    assert os.listdir(tmp_path / "bundle") == ["theirs"]


def test_what_a_killed_writer_left_is_removed_by_the_next_writer(tmp_path):
    stale = [tmp_path / (sibling_prefix(tmp_path / "report.json") + s) for s in ("k1ll3d.tmp", "0ld.old")]
    stale[0].write_text("half")
    stale[1].mkdir()
    other = tmp_path / (sibling_prefix(tmp_path / "report.json.bak") + "k1ll3d.tmp")
    other.write_text("another output's")
    atomic_write_text(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json", other.name])


def test_a_failing_write_names_the_output_not_the_temporary_file(tmp_path, monkeypatch):
    import errno

    from toolkit.core import fileio

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "write_all", full)
    with pytest.raises(DcncError, match=r"^.*/new/report.json: not written \(No space left on device\)$"):
        atomic_write_text(tmp_path / "new" / "report.json", "{}")
    assert os.listdir(tmp_path) == []
