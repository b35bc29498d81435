"""The ISA level INT8 CPU bundles are built for: detection from CPU flags, the override, what it changes."""

from __future__ import annotations

import pytest

from calibration.isa import (
    INT8_ISAS,
    check_isa,
    detect_int8_isa,
    isa_mismatch,
    weight_bits,
)
from toolkit.core.errors import DcncError
from toolkit.core.machine import cpu_identity


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        (["avx", "avx2", "fma"], "avx2"),
        (["sse4_1"], "avx2"),
        (["avx2", "avx512f", "avx512bw"], "avx512"),
        (["avx2", "avx_vnni"], "avx-vnni"),
        (["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"], "avx512-vnni"),
        (["avx512bw", "avx512_vnni", "amx_tile", "amx_int8"], "amx"),
    ],
)
def test_isa_level_comes_from_the_cpu_flags(flags, isa):
    assert detect_int8_isa(flags) == isa


def test_this_cpu_is_detected_from_its_own_flags():
    assert detect_int8_isa() == detect_int8_isa(cpu_identity()["isa"]) in INT8_ISAS


@pytest.mark.parametrize(("isa", "bits"), [("avx2", 7), ("avx512", 7), ("avx-vnni", 8), ("avx512-vnni", 8), ("amx", 8)])
def test_weights_keep_8_bits_only_where_products_accumulate_in_int32(isa, bits):
    assert weight_bits(isa) == bits


def test_an_unknown_isa_is_a_user_error():
    with pytest.raises(DcncError, match="--int8-isa 'sse'"):
        check_isa("sse")


def test_a_vnni_bundle_on_an_avx2_cpu_is_a_saturation_warning():
    assert "saturate" in isa_mismatch("avx512-vnni", "avx2")
    assert isa_mismatch("avx2", "avx512-vnni").startswith("built for avx2")
    assert isa_mismatch("amx", "amx") is None
