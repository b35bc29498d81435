"""Bundles open from their manifest alone, and only when the manifest matches the files, the installed runtime and
the device; anything else is refused with one line saying what and how to fix it."""

from __future__ import annotations

import json
import shutil

import onnxruntime
import pytest

from toolkit.backends.bundle import check_bundle, load_manifest, open_bundle
from toolkit.backends.ort.runner import OrtRunner
from toolkit.commands.build import build_bundle
from toolkit.core.errors import DcncError


@pytest.fixture(scope="module")
def built(towers_dir, tmp_path_factory):
    """A two-tower ORT bundle built once; tests that tamper with it work on a copy."""
    out = tmp_path_factory.mktemp("bundles") / "two_tower"
    build_bundle(towers_dir, out, batch=(1, 8, 32), save_optimized=True)
    return out


@pytest.fixture
def bundle(built, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(built, copy)
    return copy


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_open_bundle_gives_one_inactive_runner_per_tower_named_for_backend_and_tower(built):
    runners = open_bundle(built)
    assert sorted(runners) == ["item", "query"]
    assert all(isinstance(r, OrtRunner) and not r.is_active for r in runners.values())
    assert runners["query"].name == "ort:query"
    assert runners["query"].batch_range == (1, 32)  # (min, max) of the 1:8:32 profile


def test_open_bundle_with_a_tower_gives_that_runner(built):
    assert open_bundle(built, tower="item").name == "ort:item"


def test_unknown_tower_is_refused_with_the_towers_it_has(built):
    with pytest.raises(DcncError, match=r"no tower 'user' \(it has \['item', 'query'\]\)"):
        open_bundle(built, tower="user")


def test_modified_file_is_refused(bundle):
    with open(bundle / "query.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DcncError, match="query.onnx does not match the hash in its manifest"):
        open_bundle(bundle)


def test_missing_file_is_refused(bundle):
    (bundle / "item.ort-optimized.onnx").unlink()
    with pytest.raises(DcncError, match="item.ort-optimized.onnx is listed in the manifest but missing"):
        open_bundle(bundle)


def test_file_used_by_a_tower_but_not_hashed_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["files"].pop("query.onnx"))
    with pytest.raises(DcncError, match="tower query uses query.onnx, which the manifest does not hash"):
        load_manifest(bundle)


def test_other_onnxruntime_version_is_refused_with_how_to_rebuild(bundle):
    edit_manifest(bundle, lambda m: m["versions"].update(onnxruntime="1.0.0"))
    with pytest.raises(
        DcncError, match=f"built with onnxruntime 1.0.0, installed is {onnxruntime.__version__}; rebuild it with"
    ):
        check_bundle(bundle)


def test_optimized_graph_from_a_cpu_with_other_isa_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["device"].update(isa=["avx512f", "amx_tile", "made_up"]))
    with pytest.raises(DcncError, match="ORT-optimised graphs .* non-portable"):
        check_bundle(bundle)


def test_portable_bundle_opens_on_another_cpu(towers_dir, tmp_path):
    build_bundle(towers_dir / "query.onnx", tmp_path / "b")
    edit_manifest(tmp_path / "b", lambda m: m["device"].update(isa=["made_up"], cpu="another"))
    assert list(check_bundle(tmp_path / "b").towers) == ["query"]


def test_manifest_of_another_schema_is_refused(bundle):
    edit_manifest(bundle, lambda m: m.update(schema="dcnc.bundle/99"))
    with pytest.raises(DcncError, match="not a dcnc bundle manifest \\(schema 'dcnc.bundle/99'"):
        open_bundle(bundle)


def test_manifest_missing_fields_is_refused(bundle):
    edit_manifest(bundle, lambda m: m.pop("batch"))
    with pytest.raises(DcncError, match=r"malformed manifest \(1 problem\).*\n  batch: missing"):
        open_bundle(bundle)


@pytest.mark.parametrize("digests", [["not", "a", "table"], {"query.weight": "not-a-digest"}])
def test_source_weights_that_are_not_sha256_digests_are_refused(bundle, digests):
    edit_manifest(bundle, lambda m: next(iter(m["towers"].values())).update(source_weights=digests))
    with pytest.raises(DcncError, match=r"malformed manifest \(1 problem\).*\n  towers\.\w+\.source_weights: expected"):
        open_bundle(bundle)


def test_unreadable_manifest_is_refused(bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(DcncError, match="unreadable manifest"):
        open_bundle(bundle)


def test_directory_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(DcncError, match="not a dcnc bundle \\(no manifest.json\\)"):
        open_bundle(tmp_path)
    with pytest.raises(DcncError, match="bundle not found"):
        open_bundle(tmp_path / "nowhere")
