"""The x86 ISA level INT8 CPU bundles are built for, and what it changes: how many bits the weights keep.

ONNX Runtime's integer Gemm (MLAS QGemm, u8 activations x s8 weights) has one kernel per ISA level. Without VNNI
(AVX2, and AVX-512 without VNNI) it multiplies with vpmaddubsw, whose int16 sums of two u8 x s8 products saturate
when both operands are large, so weights keep 7 bits (onnxruntime's reduce_range). AVX-VNNI and AVX512-VNNI
(vpdpbusd) and AMX (tdpbusd) accumulate the products in int32 with no int16 step, so weights keep all 8 bits:
half the weight rounding error, the same kernel speed. The level is detected at build time (`dcnc build
--int8-isa` builds for another machine), recorded in the manifest, and `dcnc verify` warns when a bundle runs
on a CPU of another level.
"""

from __future__ import annotations

from toolkit.core.errors import DcncError

# lowest to highest; a bundle built for a level runs everywhere, but only a VNNI / AMX build keeps 8-bit weights
INT8_ISAS = ("avx2", "avx512", "avx-vnni", "avx512-vnni", "amx")
INT32_ACCUMULATING = ("avx-vnni", "avx512-vnni", "amx")


def detect_int8_isa(flags: list[str] | None = None) -> str:
    """The ISA level of this CPU (or of the given /proc/cpuinfo flags), one of INT8_ISAS: "avx2" stands for
    AVX2 and anything older (the same int16 pair sums)."""
    if flags is None:
        from toolkit.core.machine import cpu_identity

        flags = cpu_identity()["isa"]
    flags = set(flags)
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512bw" in flags:
        return "avx512"
    return "avx2"


def check_isa(isa: str) -> str:
    if isa not in INT8_ISAS:
        raise DcncError(f"--int8-isa {isa!r}: choose one of {', '.join(INT8_ISAS)}")
    return isa


def weight_bits(isa: str) -> int:
    """8 where products accumulate in int32 (VNNI, AMX), 7 where vpmaddubsw's int16 pair sums could saturate."""
    return 8 if check_isa(isa) in INT32_ACCUMULATING else 7


def saturates_here(built_for: str, here: str | None = None) -> bool:
    """Weights built for `built_for` keep more bits than the kernel of this CPU (or of `here`) sums without
    saturating: run here, the graph does not compute what it computes on the CPU it was built for."""
    return weight_bits(built_for) > weight_bits(here or detect_int8_isa())


def isa_mismatch(built_for: str, here: str | None = None) -> str | None:
    """Why an INT8 bundle built for `built_for` runs differently on this CPU (or on `here`), or None."""
    here = here or detect_int8_isa()
    if built_for == here or built_for not in INT8_ISAS:
        return None
    if saturates_here(built_for, here):
        return (f"built for {built_for} (8-bit weights), this CPU is {here}: its u8 x s8 kernel sums pairs of"
                " products in int16, which 8-bit weights can saturate; rebuild with --int8-isa " + here)  # fmt: skip
    return f"built for {built_for}, this CPU is {here}: its speed was measured for another kernel"
