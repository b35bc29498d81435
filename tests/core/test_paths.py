"""toolkit.core.paths: paths a file names stay inside its folder; outputs are checked before any work."""

from __future__ import annotations

import os

import pytest

from toolkit.core.errors import DcncError
from toolkit.core.paths import DIR, FILE, FOLDER, check_outputs, contained, output


def test_a_relative_name_inside_the_folder_is_kept(tmp_path):
    assert contained(tmp_path, "sub/../model.onnx", "manifest") == tmp_path / "sub/../model.onnx"


@pytest.mark.parametrize("name, message", [
    ("../x", "resolves outside"), ("/etc/hostname", "absolute path"), ("a/../../x", "resolves outside"),
    ("", "not a relative file name"), (".", "resolves outside"), (3, "not a relative file name"),
])
def test_names_that_leave_the_folder_are_refused_naming_the_file_that_names_them(tmp_path, name, message):
    with pytest.raises(DcncError, match=f"^manifest.json: .*{message}"):
        contained(tmp_path, name, "manifest.json")


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link").symlink_to(tmp_path)
    with pytest.raises(DcncError, match="resolves outside"):
        contained(tmp_path / "inside", "link/secret", "manifest.json")


def test_an_output_that_is_an_input_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_text("")
    with pytest.raises(DcncError, match="is an input"):
        check_outputs([output(tmp_path / "model.onnx", "-o", replace=True)], [tmp_path / "model.onnx"])


def test_an_output_folder_holding_an_input_is_refused(tmp_path):
    (tmp_path / "model.pt").write_text("")
    with pytest.raises(DcncError, match="holds the input"):
        check_outputs([output(tmp_path, "-o", DIR, replace=True)], [tmp_path / "model.pt"])


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    with pytest.raises(DcncError, match="lies inside the input folder"):
        check_outputs([output(tmp_path / "bundle" / "report.json", "--report", replace=True)], [tmp_path])


def test_references_that_are_not_files_are_no_inputs(tmp_path):
    check_outputs([output(tmp_path / "o.onnx", "-o")], ["mypkg.towers:make", "dataset:synthetic", None])


def test_the_working_folder_may_hold_a_written_folder_but_not_be_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_outputs([output(".", "--out", FOLDER)])
    with pytest.raises(DcncError, match="give a file or folder name"):
        check_outputs([output(".", "-o", DIR, replace=True)])
    with pytest.raises(DcncError, match="current folder or one above it"):
        check_outputs([output(tmp_path, "-o", DIR, replace=True)])


def test_kinds_and_existence(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DcncError, match="is a folder; give the file"):
        check_outputs([output(tmp_path / "folder", "--report", FILE, replace=True)])
    with pytest.raises(DcncError, match="exists and is not a folder"):
        check_outputs([output(tmp_path / "file", "--out", FOLDER)])
    with pytest.raises(DcncError, match="already exists"):
        check_outputs([output(tmp_path / "folder", "-o", DIR)])
    check_outputs([output(tmp_path / "folder", "-o", DIR, replace=True)])
    check_outputs([output(tmp_path / "folder", "--out", FOLDER)])


def test_two_outputs_at_one_path_are_refused(tmp_path):
    with pytest.raises(DcncError, match="--junit .*: also given as --report"):
        check_outputs([output(tmp_path / "r", "--report", replace=True), output(tmp_path / "r", "--junit", replace=True)])


def test_a_dangling_symlink_and_a_long_name_are_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DcncError, match="which does not exist"):
        check_outputs([output(tmp_path / "link", "-o")])
    with pytest.raises(DcncError, match="256 bytes long"):
        check_outputs([output(tmp_path / ("x" * 256), "-o")])
    check_outputs([output(tmp_path / ("x" * 255), "-o")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(DcncError, match="is not writable"):
        check_outputs([output(tmp_path / "ro" / "new" / "bundle", "-o", DIR)])
