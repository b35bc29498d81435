"""What `dcnc build` prints of an INT8 search: the curve, where it was judged, and when INT8 buys no speed."""

from __future__ import annotations

from toolkit.core.lowering import Int8Lowering


def _record(speedups: list[float | None], chosen: int, emulated: bool = False) -> Int8Lowering:
    points = [{"recipe": "float+smooth", "kept": [], "agreement": {"agreement@100": 0.99 + i / 1000}, "speedup": s}
              for i, s in enumerate(speedups)]  # fmt: skip
    search = {"metric": "agreement@100", "target": 0.99, "held_out_rows": 1024, "timing_batch": 256,
              "points": points, "chosen": points[chosen], "chosen_index": chosen, "emulated": emulated}  # fmt: skip
    return Int8Lowering(target="cpu", method="minmax", percentile=None, calibration_key="k", cache_hit=False,
                        calibration_samples=1024, quantized_nodes=[], kept_fp32=[], quantize_embeddings=False,
                        isa="avx2", search=search)  # fmt: skip


def test_a_chosen_point_no_faster_than_fp32_is_said_with_the_fastest_point_tried():
    lines = _record([1.27, 1.02], chosen=1).curve()
    assert lines[-1].startswith("note: at this target INT8 runs 1.02x FP32 on this CPU (avx2, batch 256; the fastest"
                                " point tried 1.27x)")  # fmt: skip


def test_a_worthwhile_or_untimed_point_gets_no_note():
    assert not any(line.startswith("note:") for line in _record([1.27, 1.6], chosen=1).curve())
    assert not any(line.startswith("note:") for line in _record([None], chosen=0, emulated=True).curve())


def test_a_search_judged_for_another_cpu_says_so():
    assert "judged on the unfused Q/DQ graph" in _record([None], chosen=0, emulated=True).curve()[0]
