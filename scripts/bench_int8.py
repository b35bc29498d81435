"""Benchmark (not a test): each INT8 lever on CPU alone and combined, on every model issue 15 names, with the
counting that bounds the compute-bound tower's speedup. Its tables are the ones in docs/int8.md.

Models: the example two-tower and ranker (`dcnc train`), the MovieLens-100K two-tower (`dcnc train --dataset
movielens`), a random zoo tower of each cross kind (tests/zoo.py, query tower of the retrieval family), and a
compute-bound parallel tower (x0 512 wide: twelve 32-d id features beside 128 dense floats; MLP 1024-512-256,
3 full-rank cross layers, 128-d output: 17 GFLOP per batch of 4096), random weights, random-but-realistic
inputs (Zipf ids, standardised log-normal dense features).

Levers (a recipe is one combination; `base` is what `dcnc build --precision int8` did before issue 15):
- R: 8-bit weights (reduce_range off), right on VNNI / AMX, whose u8 x s8 dot products accumulate in int32;
- F: the cross layers' product and residual add in float, each Gemm reading its own Q/DQ copy of its input,
  against QLinearMul / QLinearAdd (`integer`);
- S: outlier smoothing (calibration.smoothing: per-channel scales folded into producers and weights);
- B: bias correction (calibration.bias);
- calibration method: minmax (default), entropy, percentile (with each Gemm input's clipping, see --clipping);
- M: metric-targeted mixed precision, the fewest layers kept FP32 for held-out agreement >= --target.

Quality, per model, deterministic: calibration rows split 75/25 (seeded); ranges, smoothing and bias from the
75%; on the 25% held out (duplicates dropped) agreement@10/@100 of each row's nearest neighbours among the
others (embedding towers) or the share of score pairs in the same order (rankers). Two-towers also: agreement@K
and recall@100 ratio on their eval split (both towers INT8); the ranker: AUC delta on its eval split.
Speed: INT8 / FP32 time ratio at batch 64 and 4096, all of a tower's sessions interleaved in one run (the
library's timer), median of rounds; the load average before and after is printed with the CPU's ISA.

    .venv/bin/python scripts/bench_int8.py --example runs/example --movielens runs/ml --out runs/int8_levers.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/zoo.py, the zoo towers

from calibration.bias import correct_biases  # noqa: E402
from calibration.qdq import quantizable_nodes, quantize_with_ranges  # noqa: E402
from calibration.ranges import collect_ranges  # noqa: E402
from calibration.reader import CalibrationData  # noqa: E402
from calibration.sensitivity import group_units  # noqa: E402
from calibration.smoothing import smooth_outliers  # noqa: E402
from toolkit.core.onnxio import graph_inputs  # noqa: E402
from toolkit.evaluate import metrics  # noqa: E402

HELD_OUT = 0.5  # agreement@100 needs N >> 100 held-out rows: about 1000 of the 2048 calibration rows
BATCHES = (64, 4096)
TARGET = 0.99


@dataclass(frozen=True)
class Recipe:
    """One combination of levers (see the module docstring)."""

    name: str
    reduce_range: bool = True
    cross_path: str = "integer"
    smooth: bool = False
    bias: bool = False
    method: str = "minmax"


RECIPES = [
    Recipe("base"),
    Recipe("R", reduce_range=False),
    Recipe("F", cross_path="float"),
    Recipe("S", smooth=True),
    Recipe("B", bias=True),
    Recipe("entropy", method="entropy"),
    Recipe("percentile", method="percentile"),
    Recipe("R+S", reduce_range=False, smooth=True),
    Recipe("R+F", reduce_range=False, cross_path="float"),
    Recipe("R+F+S", reduce_range=False, cross_path="float", smooth=True),
    Recipe("R+S+B", reduce_range=False, smooth=True, bias=True),
    Recipe("R+F+S+B", reduce_range=False, cross_path="float", smooth=True, bias=True),
    Recipe("R+S percentile", reduce_range=False, smooth=True, method="percentile"),
    Recipe("R+F+S percentile", reduce_range=False, cross_path="float", smooth=True, method="percentile"),
    Recipe("R+F+S entropy", reduce_range=False, cross_path="float", smooth=True, method="entropy"),
]
SEARCHED = ("R+S", "R+F+S")  # the fast and the accurate default, each with layers kept FP32 for the target


@dataclass
class Tower:
    """One tower graph with its calibration rows split into fit and held-out parts."""

    name: str
    model: object  # onnx.ModelProto, FP32
    fit: CalibrationData
    held_out: dict[str, np.ndarray]
    scoring: bool  # one score per row (pair order) rather than an embedding (neighbours)
    timing: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # batch -> feeds


@dataclass
class Subject:
    """A model under test: its towers and, where it has one, its eval split."""

    name: str
    towers: dict[str, Tower]
    retrieval: dict | None = None  # query/<input>, item/<input>, relevance
    ranking: dict | None = None  # <input>..., label
    timed: bool = True


# --- models -------------------------------------------------------------------------------------------------
def exported(module) -> object:
    from graphs.export import tower_to_onnx
    from graphs.passes.manager import run_passes
    from toolkit.model.loading import LoadedTower

    return run_passes(tower_to_onnx(LoadedTower("tower", module.eval(), list(module.input_specs),
                                                list(module.output_names))))[0]  # fmt: skip


def tower(name: str, model, rows: dict[str, np.ndarray], seed: int = 0) -> Tower:
    """Split `rows` (calibration samples) into fit rows and de-duplicated held-out rows; timing feeds drawn
    from all rows."""
    count = len(next(iter(rows.values())))
    order = np.random.default_rng(seed).permutation(count)
    held = np.sort(order[: int(count * HELD_OUT)])
    fit = np.sort(order[int(count * HELD_OUT) :])
    held_rows = {k: v[held] for k, v in rows.items()}
    blob = np.concatenate([np.ascontiguousarray(held_rows[k]).reshape(len(held), -1).view(np.uint8)
                           for k in sorted(held_rows)], axis=1)  # fmt: skip
    unique = np.sort(np.unique(blob, axis=0, return_index=True)[1])
    scoring = len(model.graph.output[0].type.tensor_type.shape.dim) < 2 or (
        model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 1
    )
    draw = np.random.default_rng(seed + 1)
    timing = {b: {k: v[draw.integers(0, count, b)] for k, v in rows.items()} for b in BATCHES}
    return Tower(name, model, CalibrationData({k: v[fit] for k, v in rows.items()}),
                 {k: v[unique] for k, v in held_rows.items()}, scoring, timing)  # fmt: skip


def trained(folder: Path, label: str) -> list[Subject]:
    """The two-tower and ranker `dcnc train` wrote into `folder`."""
    from toolkit.model.loading import load_model

    subjects = []
    two_tower = load_model(str(folder / "two_tower.pt"))
    towers = {t: tower(t, exported(tw.module), dict(np.load(folder / f"{t}_calib.npz")))
              for t, tw in two_tower.towers.items()}  # fmt: skip
    subjects.append(Subject(f"{label} two-tower", towers, retrieval=dict(np.load(folder / "two_tower_eval.npz"))))
    ranker = load_model(str(folder / "ranker.pt"))
    module = ranker.towers["ranker"].module
    subjects.append(Subject(f"{label} ranker", {"ranker": tower("ranker", exported(module),
                            dict(np.load(folder / "ranker_calib.npz")))}, ranking=dict(np.load(folder / "ranker_eval.npz"))))  # fmt: skip
    return subjects


def random_rows(model, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Zipf-distributed ids (a random order of each table), standardised log-normal dense features."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph_inputs(model):
        shape = spec.concrete_shape(rows)
        if spec.dtype.startswith("int"):
            high = _table_rows(model, spec.name)
            feeds[spec.name] = rng.permutation(high)[np.minimum(rng.zipf(1.1, shape) - 1, high - 1)].astype(spec.dtype)
        else:
            sigma = rng.uniform(0.5, 1.5, shape[-1])
            raw = np.log1p(rng.lognormal(0.0, sigma, shape))
            feeds[spec.name] = ((raw - raw.mean(axis=0)) / raw.std(axis=0)).astype(spec.dtype)
    return feeds


def _table_rows(model, ids: str) -> int:
    from onnx import numpy_helper

    tables = {init.name: init for init in model.graph.initializer}
    lookup = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == ids)
    return numpy_helper.to_array(tables[lookup.input[0]]).shape[0]


def compute_bound_spec():
    from toolkit.model.spec import CrossSpec, DenseFeature, SparseFeature, TowerSpec

    return TowerSpec(sparse=[SparseFeature(f"id_{i}", cardinality=10_000, dim=32) for i in range(12)],
                     dense=[DenseFeature("dense", dim=128)], cross=CrossSpec("full", layers=3),
                     deep=[1024, 512, 256], structure="parallel", out_dim=128)  # fmt: skip


def synthetic_subjects() -> list[Subject]:
    """The compute-bound tower and one zoo tower per cross kind, random weights and inputs."""
    import torch
    import zoo

    from toolkit.model.zoo.cross import CROSS_KINDS
    from toolkit.model.zoo.families import RetrievalTower

    torch.manual_seed(0)
    big = exported(RetrievalTower(compute_bound_spec()))
    subjects = [Subject("compute-bound tower", {"tower": tower("tower", big, random_rows(big, 2048, 0))})]
    for kind in CROSS_KINDS:
        model = exported(zoo.zoo_model("retrieval", kind)[0].towers()["query"])
        subjects.append(Subject(f"zoo {kind}", {"query": tower("query", model, random_rows(model, 2048, 0))}, timed=False))
    return subjects


# --- lowering -----------------------------------------------------------------------------------------------
class Lowerer:
    """INT8 graphs of one tower per recipe and kept layers; smoothing and ranges computed once per setting."""

    def __init__(self, tower: Tower):
        self.tower = tower
        self.cache: dict = {}

    def prepared(self, recipe: Recipe):
        """(graph to quantize, its ranges, float nodes smoothing inserted) for the recipe's smoothing and method."""
        key = (recipe.smooth, recipe.reduce_range, recipe.method)
        if key not in self.cache:
            model, inserted = self.tower.model, []
            if recipe.smooth:
                model, record = smooth_outliers(model, self.tower.fit.batches, 63 if recipe.reduce_range else 127)
                inserted = record.inserted
            self.cache[key] = (model, collect_ranges(model, self.tower.fit.batches, recipe.method), inserted)
        return self.cache[key]

    def lower(self, recipe: Recipe, keep: list[str] = ()):
        model, ranges, inserted = self.prepared(recipe)

        def quantize(graph):
            return quantize_with_ranges(graph, ranges, "cpu", [*inserted, *keep], reduce_range=recipe.reduce_range,
                                        cross_path=recipe.cross_path)[0]  # fmt: skip

        if recipe.bias:
            model, _ = correct_biases(model, quantize, self.tower.fit.batches)
        return quantize(model)


def session(model, profile_prefix: str | None = None):
    """A CPU session as a bundle opens it, with intra-op spinning off (sessions are timed in turn)."""
    from toolkit.backends.ort.loader import ort_session

    return ort_session(model, spinning=False, profile_prefix=profile_prefix)


def held_out_agreement(tower: Tower, reference: np.ndarray, model) -> dict[str, float]:
    output = session(model).run(None, tower.held_out)[0]
    if tower.scoring:
        return {"pairs": metrics.pair_order_agreement(reference, output)}
    return {f"@{k}": v for k, v in metrics.neighbour_agreement(reference, output, (10, 100)).items()}


def target_value(agreement: dict[str, float]) -> float:
    return agreement.get("@100", agreement.get("pairs"))


def search(lowerer: Lowerer, recipe: Recipe, reference: np.ndarray, target: float) -> tuple[list[str], list]:
    """Layers kept FP32 (greedy by leave-one-out recovery) until held-out agreement >= target; the curve."""
    tower = lowerer.tower
    units = group_units(tower.model, quantizable_nodes(tower.model), "layer")

    def score(kept: list[str]) -> float:
        nodes = [n for unit in kept for n in units[unit]]
        return target_value(held_out_agreement(tower, reference, lowerer.lower(recipe, nodes)))

    curve = [([], score([]))]
    if curve[0][1] < target:
        recovery = {unit: score([unit]) for unit in units}
        order = sorted(units, key=lambda u: -recovery[u])
        for count in range(1, len(order)):
            curve.append((order[:count], score(order[:count])))
            if curve[-1][1] >= target:
                break
    kept = curve[-1][0]
    return [n for unit in kept for n in units[unit]], [(list(k), round(v, 4)) for k, v in curve]


# --- measuring ----------------------------------------------------------------------------------------------
def quality(subject: Subject, models: dict[str, dict[str, object]]) -> dict[str, dict]:
    """Per variant: held-out agreement per tower, and the eval-split metrics where the model has them."""
    results = {}
    references = {t: session(tw.model).run(None, tw.held_out)[0] for t, tw in subject.towers.items()}
    fp32 = {t: tw.model for t, tw in subject.towers.items()}
    eval_fp32 = evaluate(subject, fp32)
    for variant, graphs in models.items():
        entry = {t: held_out_agreement(subject.towers[t], references[t], g) for t, g in graphs.items()}
        entry["eval"] = evaluate(subject, graphs, eval_fp32)
        results[variant] = entry
    return results


def evaluate(subject: Subject, graphs: dict, reference: dict | None = None) -> dict:
    """Eval-split metrics of the variant (both towers of a two-tower lowered alike); with `reference` (FP32's
    result), agreement@K and recall ratio / AUC delta against it."""
    if subject.retrieval is not None:
        data = subject.retrieval
        side = {t: {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(f"{t}/")} for t in ("query", "item")}
        emb = {t: session(graphs[t]).run(None, side[t])[0] for t in ("query", "item")}
        top = metrics.exact_top_k(emb["query"], [emb["item"]], 100).ids
        recall = metrics.recall_at_k(top, data["relevance"], [100])[100]
        if reference is None:
            return {"top": top, "recall@100": recall}
        agreement = metrics.agreement_at_k(reference["top"], top, (1, 10, 100))
        return {f"agreement@{k}": v for k, v in agreement.items()} | {"recall@100 ratio": recall / reference["recall@100"]}
    if subject.ranking is not None:
        data = dict(subject.ranking)
        labels = data.pop("label")
        logits = session(graphs["ranker"]).run(None, data)[0]
        auc = metrics.auc(labels, logits)
        if reference is None:
            return {"auc": auc, "logits": logits}
        return {"auc delta": auc - reference["auc"], "pair agreement": metrics.pair_order_agreement(reference["logits"], logits)}
    return {}


def speed(subject: Subject, models: dict[str, dict[str, object]], iterations: dict[int, int]) -> dict:
    """Per tower and batch: INT8 / FP32 speedup of each variant (median FP32 ms / median INT8 ms), all variants
    and FP32 interleaved in one run."""
    from toolkit.backends.timing import time_interleaved

    result = {}
    for name, tw in subject.towers.items():
        sessions = {"fp32": session(tw.model)} | {v: session(g[name]) for v, g in models.items()}
        for batch, feeds in tw.timing.items():
            calls = {v: (lambda s=s, f=feeds: s.run(None, f)) for v, s in sessions.items()}
            samples = time_interleaved(calls, warmup=3, iterations=iterations[batch])
            medians = {v: float(np.median(s)) for v, s in samples.items()}
            result[f"{name}@{batch}"] = {"fp32_ms": medians["fp32"]} | {
                v: medians["fp32"] / medians[v] for v in models
            }
    return result


def clipping(tower: Tower) -> list[dict]:
    """Per Gemm input: its minmax range, and the range entropy and percentile chose with the share clipped."""
    ranges = {m: collect_ranges(tower.model, tower.fit.batches, m) for m in ("minmax", "entropy", "percentile")}
    rows = []
    for node in tower.model.graph.node:
        if node.op_type in ("Gemm", "MatMul") and node.input[0] in ranges["minmax"].minmax:
            name = node.input[0]
            row = {"gemm": node.name, "minmax": ranges["minmax"].minmax[name]}
            for method in ("entropy", "percentile"):
                row[method] = ranges[method].calibrated[name]
                row[f"{method} clipped"] = ranges[method].clipped[name]
            rows.append(row)
    return rows


def machine() -> str:
    from toolkit.core.machine import cpu_identity

    identity = cpu_identity()
    return f"{identity['cpu']}, {identity['cores']} cores, ISA {' '.join(identity['isa'])}"


# --- counting (DESIGN.md, "Method for performance work") -----------------------------------------------------
GEMM_OPS = ("Gemm", "FusedGemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat")
PEAK_SHAPE = (4096, 1024, 1024)


def op_profiles(models: dict, feeds: dict, runs: int, folder: Path) -> dict[str, dict[str, float]]:
    """Kernel milliseconds per run of each op type of each model, from onnxruntime's profiler, the models run
    interleaved; each op type's fastest run (the least disturbed by other processes on a shared machine), plus
    `total` and `gemm`, their sums over all ops and over Gemm-like ops."""
    timed = {name: session(model, profile_prefix=str(folder / f"profile-{name}")) for name, model in models.items()}
    for _ in range(3 + runs):
        for sess in timed.values():
            sess.run(None, feeds)
    profiles = {}
    for name, sess in timed.items():
        events = json.loads(Path(sess.end_profiling()).read_text())
        starts = [e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-runs:]
        per_op: dict[str, np.ndarray] = collections.defaultdict(lambda: np.zeros(runs))
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= starts[0]:
                run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
                per_op[event["args"]["op_name"]][run] += event["dur"] / 1e3
        profile = {op: float(ms.min()) for op, ms in per_op.items()}
        profile["gemm"] = sum(ms for op, ms in profile.items() if op in GEMM_OPS)
        profile["total"] = sum(ms for op, ms in profile.items() if op != "gemm")
        profiles[name] = profile
    return profiles


def _graph(nodes, inputs, outputs, initializers):
    from onnx import helper

    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _time_pair(fp32, int8, iterations: int) -> tuple[float, float]:
    """Fastest ms of each side, timed interleaved (a peak is the best the machine does)."""
    from toolkit.backends.timing import time_interleaved

    (a, feeds_a), (b, feeds_b) = fp32, int8
    samples = time_interleaved({"fp32": lambda: a.run(None, feeds_a), "int8": lambda: b.run(None, feeds_b)},
                               warmup=2, iterations=iterations)  # fmt: skip
    return float(samples["fp32"].min()), float(samples["int8"].min())


def matmul_peak(m: int, k: int, n: int, iterations: int = 8) -> tuple[float, float]:
    """(FP32 GFLOP/s, U8S8 GOP/s) of one [m,k]x[k,n] MatMul in onnxruntime: MatMul vs MatMulInteger."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    fp32 = _graph([helper.make_node("MatMul", ["a", "w"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                  [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])  # fmt: skip
    u8s8 = _graph([helper.make_node("MatMulInteger", ["a", "w", "a_zero"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                  [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w"),
                   numpy_helper.from_array(np.array(128, np.uint8), "a_zero")])  # fmt: skip
    a = rng.standard_normal((m, k)).astype(np.float32)
    a8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
    f, q = _time_pair((session(fp32), {"a": a}), (session(u8s8), {"a": a8}), iterations)
    return 2 * m * k * n / f / 1e6, 2 * m * k * n / q / 1e6


def gemm_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every Gemm with a constant [out, in] (transB) or [in, out] weight, in graph order."""
    from onnx import numpy_helper

    weights = {init.name: numpy_helper.to_array(init).shape for init in model.graph.initializer}
    shapes = []
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in weights:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out, k = weights[node.input[1]] if trans_b else weights[node.input[1]][::-1]
            shapes.append((k, out))
    return shapes


def gemm_shape_times(shapes: list[tuple[int, int]], batch: int, iterations: int = 40) -> tuple[float, float]:
    """Summed ms of the tower's Gemms run alone at `batch`: FP32 Gemm (+bias) vs U8S8 QGemm with per-channel
    8-bit weights and a uint8 output, as the INT8 graph runs them on VNNI."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    fp32_ms = int8_ms = 0.0
    def const(value, name):
        return numpy_helper.from_array(np.asarray(value), name)

    for k, n in shapes:
        fp32 = _graph([helper.make_node("Gemm", ["a", "w", "b"], ["y"], transB=1)],
                      [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
                      [const(rng.standard_normal((n, k)).astype(np.float32), "w"), const(np.zeros(n, np.float32), "b")])
        names = ["a", "a_scale", "a_zero", "w", "w_scale", "w_zero", "b", "y_scale", "y_zero"]
        qgemm = _graph([helper.make_node("QGemm", names, ["y"], transB=1, domain="com.microsoft")],
                       [helper.make_tensor_value_info("a", TensorProto.UINT8, [batch, k])],
                       [helper.make_tensor_value_info("y", TensorProto.UINT8, [batch, n])],
                       [const(np.float32(0.02), "a_scale"), const(np.uint8(128), "a_zero"),
                        const(rng.integers(-127, 128, (n, k)).astype(np.int8), "w"),
                        const(np.full(n, 0.01, np.float32), "w_scale"), const(np.zeros(n, np.int8), "w_zero"),
                        const(np.zeros(n, np.int32), "b"), const(np.float32(0.5), "y_scale"),
                        const(np.uint8(128), "y_zero")])  # fmt: skip
        a = rng.standard_normal((batch, k)).astype(np.float32)
        a8 = rng.integers(0, 256, (batch, k)).astype(np.uint8)
        f, q = _time_pair((session(fp32), {"a": a}), (session(qgemm), {"a": a8}), iterations)
        fp32_ms, int8_ms = fp32_ms + f, int8_ms + q
    return fp32_ms, int8_ms


def amdahl(gemm_share: float, gemm_speedup: float) -> float:
    """Whole-graph speedup when only the Gemm share of the time gets `gemm_speedup` faster."""
    return 1.0 / ((1.0 - gemm_share) + gemm_share / gemm_speedup)


def counting(tower: Tower, int8, batch: int = 4096) -> dict:
    """FLOPs, the Gemm share of FP32 kernel time, the U8S8 / FP32 ratio r of the tower's own Gemm shapes and of
    a large MatMul, and the Amdahl bound 1 / ((1 - p) + p / r) on INT8's speedup."""
    import onnx

    from graphs.inspect import inspect_model

    with tempfile.TemporaryDirectory(prefix="dcnc-count-") as folder:
        onnx.save(tower.model, Path(folder) / "tower.onnx")
        flops = inspect_model(Path(folder) / "tower.onnx")["flops_per_sample"]["total"]
        profiles = op_profiles({"fp32": tower.model, "int8": int8}, tower.timing[batch], 5, Path(folder))
    fp32, quantized = profiles["fp32"], profiles["int8"]
    share = fp32["gemm"] / fp32["total"]
    f_ms, q_ms = gemm_shape_times(gemm_shapes(tower.model), batch, iterations=5)
    f_peak, q_peak = matmul_peak(*PEAK_SHAPE)
    return {
        "gflop_per_batch": flops * batch / 1e9, "fp32_kernels_ms": fp32["total"], "fp32_gemm_ms": fp32["gemm"],
        "gemm_share": share, "int8_kernels_ms": quantized["total"], "int8_gemm_ms": quantized["gemm"],
        "shapes_fp32_ms": f_ms, "shapes_u8s8_ms": q_ms, "r_shapes": f_ms / q_ms,
        "peak_fp32_gflops": f_peak, "peak_u8s8_gops": q_peak, "r_peak": q_peak / f_peak,
        "amdahl_shapes": amdahl(share, f_ms / q_ms), "amdahl_peak": amdahl(share, q_peak / f_peak),
        "kernels_ratio": fp32["total"] / quantized["total"],
    }  # fmt: skip


# --- the run ------------------------------------------------------------------------------------------------
def run_subject(subject: Subject, args) -> dict:
    print(f"== {subject.name}", flush=True)
    lowerers = {t: Lowerer(tw) for t, tw in subject.towers.items()}
    recipes = [r for r in RECIPES if not args.recipes or r.name in args.recipes]
    models = {r.name: {t: lw.lower(r) for t, lw in lowerers.items()} for r in recipes}
    searches = {}
    # a two-tower's retrievals see both towers' errors: each embedding tower gets an equal share of the budget
    embedding = sum(not tw.scoring for tw in subject.towers.values())
    per_tower = {t: 1 - (1 - args.target) / (embedding if not tw.scoring else 1) for t, tw in subject.towers.items()}
    for name in SEARCHED:
        recipe = next(r for r in RECIPES if r.name == name)
        kept, curves = {}, {}
        for t, lw in lowerers.items():
            reference = session(lw.tower.model).run(None, lw.tower.held_out)[0]
            kept[t], curves[t] = search(lw, recipe, reference, per_tower[t])
        models[f"{name}+M"] = {t: lowerers[t].lower(recipe, kept[t]) for t in lowerers}
        searches[f"{name}+M"] = curves
    result = {"quality": quality(subject, models), "searches": searches}
    for variant, entry in result["quality"].items():
        print(f"  {variant:22s} " + json.dumps({k: v for k, v in entry.items()}, default=float)[:400], flush=True)
    if subject.timed and not args.no_speed:
        load = os.getloadavg()
        iterations = {64: args.iterations * 10, 4096: max(5, args.iterations // (4 if "compute" in subject.name else 1))}
        result["speed"] = speed(subject, models, iterations)
        result["load"] = [load[0], os.getloadavg()[0]]
        for key, entry in result["speed"].items():
            print(f"  speed {key}: " + " ".join(f"{k} {v:.2f}" for k, v in entry.items()), flush=True)
    if "compute" in subject.name and not args.no_speed:
        tw = subject.towers["tower"]
        result["counting"] = {v: counting(tw, models[v]["tower"]) for v in ("R+S", "R+S+M") if v in models}
        print("  counting " + json.dumps(result["counting"]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=Path("runs/example"), help="`dcnc train` output (synthetic)")
    parser.add_argument("--movielens", type=Path, default=Path("runs/ml"), help="`dcnc train --dataset movielens` output")
    parser.add_argument("--only", nargs="*", default=[], help="models whose name contains one of these words")
    parser.add_argument("--recipes", nargs="*", default=[], help="recipe names (default: all)")
    parser.add_argument("--target", type=float, default=TARGET, help="held-out agreement for the M search")
    parser.add_argument("--iterations", type=int, default=40, help="timed rounds at batch 4096 (x10 at 64)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    args = parser.parse_args()
    print(f"machine: {machine()}; onnxruntime CPU, sequential, intra-op threads = cores", flush=True)
    subjects = trained(args.example, "example") + trained(args.movielens, "movielens") + synthetic_subjects()
    subjects = [s for s in subjects if not args.only or any(w in s.name for w in args.only)]
    report = {"machine": machine(), "target": args.target, "subjects": {}}
    for subject in subjects:
        report["subjects"][subject.name] = run_subject(subject, args)
    clip_towers = {s.name: s.towers[next(iter(s.towers))] for s in subjects if s.name in ("example two-tower", "compute-bound tower")}
    report["clipping"] = {name: clipping(tw) for name, tw in clip_towers.items()}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=_json))
        print(f"wrote {args.out}")


def _json(value):
    if isinstance(value, np.ndarray):
        return None  # top-K ids and logits stay out of the file
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))


if __name__ == "__main__":
    main()
