"""Benchmark (not a test): each INT8 lever on CPU alone and combined, and `dcnc build`'s default, on every model of
issue 15, with the counting that bounds the compute-bound tower's speedup (scripts/int8_counting.py). Its
tables are the ones in docs/int8.md.

Models: the example two-tower and ranker (`dcnc train`), the MovieLens-100K two-tower and ranker (`dcnc train
--dataset movielens`), a random zoo tower of each cross kind (tests/zoo.py, the retrieval family's query tower),
and a compute-bound parallel tower (x0 512 wide: twelve 32-d id features beside 128 dense floats; MLP
1024-512-256, 3 full-rank cross layers, 128-d output: 17 GFLOP per batch of 4096) with random weights and
random-but-realistic inputs (Zipf ids, standardised log-normal dense features).

Levers (`base` is what `dcnc build --precision int8` did before issue 15: 7-bit weights, uint8 cross layers):
R 8-bit weights (the VNNI / AMX ISA level); F the cross layers' product and residual in float, each Gemm reading
its own Q/DQ copy (against QLinearMul / QLinearAdd); S outlier smoothing; B bias correction; entropy /
percentile calibration (minmax otherwise); M layers kept FP32 for held-out agreement >= --target (calibration.
search on that recipe alone); `default` is `dcnc build`'s own lowering (toolkit.commands.int8_search).

Quality (deterministic): each tower's calibration rows split as `dcnc build` splits them (calibration.reader.
hold_out); held-out agreement@10/@100 of each row's nearest neighbours among the others (embedding towers) or
the share of score pairs in the same order (rankers); two-towers also agreement@K and recall@100 ratio on their
eval split (both towers INT8), rankers AUC and log-loss deltas. A variant with 8-bit weights on a CPU without
VNNI (whose fused kernel would saturate them) is judged on its unfused Q/DQ graph, the integer result a VNNI
kernel computes, and not timed. Speed: INT8 / FP32 time ratio at batch 64 and 4096, all of a tower's graphs
interleaved in one run, medians; the load average before and after.

    .venv/bin/python scripts/bench_int8.py --example runs/example --movielens runs/ml --out runs/int8_levers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/zoo.py, the zoo towers

from int8_counting import counting, session  # noqa: E402

from calibration.int8 import Int8Lowerer, Int8Recipe  # noqa: E402
from calibration.reader import CalibrationData, hold_out  # noqa: E402
from calibration.search import HELD_OUT_FRACTION, search_precision  # noqa: E402
from toolkit.commands.int8_search import DEFAULT_MIN_AGREEMENT, searched_int8  # noqa: E402
from toolkit.core.errors import DcncError  # noqa: E402
from toolkit.core.onnxio import graph_inputs, graph_outputs  # noqa: E402
from toolkit.evaluate import metrics  # noqa: E402
from toolkit.evaluate.task_metrics import held_out_metric  # noqa: E402

BATCHES = (64, 4096)


@dataclass(frozen=True)
class Variant:
    """One combination of levers: the ISA level (R: a VNNI one), the recipe, the calibration method, and M."""

    name: str
    isa: str = "avx2"
    recipe: Int8Recipe = Int8Recipe("integer", smooth=False)
    method: str = "minmax"
    search: bool = False


def _recipe(path: str = "integer", smooth: bool = False, bias: bool = False) -> Int8Recipe:
    return Int8Recipe(path, smooth, bias)


VNNI = "avx512-vnni"
# `dcnc build`'s lowering: for this CPU's level, and with --int8-isa for each of the two weight widths
DEFAULTS = {"default": None, "default avx2": "avx2", "default vnni": VNNI}
VARIANTS = [
    Variant("base"),
    Variant("R", VNNI),
    Variant("F", recipe=_recipe("float")),
    Variant("S", recipe=_recipe(smooth=True)),
    Variant("B", recipe=_recipe(bias=True)),
    Variant("entropy", method="entropy"),
    Variant("percentile", method="percentile"),
    Variant("R+S", VNNI, _recipe(smooth=True)),
    Variant("R+F", VNNI, _recipe("float")),
    Variant("R+F+S", VNNI, _recipe("float", True)),
    Variant("R+S+B", VNNI, _recipe(smooth=True, bias=True)),
    Variant("R+F+S+B", VNNI, _recipe("float", True, True)),
    Variant("R+S percentile", VNNI, _recipe(smooth=True), "percentile"),
    Variant("R+F+S percentile", VNNI, _recipe("float", True), "percentile"),
    Variant("R+F+S entropy", VNNI, _recipe("float", True), "entropy"),
    Variant("R+S+M", VNNI, _recipe(smooth=True), search=True),
    Variant("R+F+S+M", VNNI, _recipe("float", True), search=True),
]


@dataclass
class Tower:
    """One tower graph, its calibration rows split as `dcnc build` splits them, and rows to time."""

    name: str
    model: object  # onnx.ModelProto, FP32
    rows: CalibrationData
    fit: CalibrationData
    held_out: dict[str, np.ndarray]
    timing: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # batch -> feeds

    @classmethod
    def split(cls, name: str, model, rows: dict[str, np.ndarray]) -> Tower:
        fit, held_out = hold_out(CalibrationData(rows), HELD_OUT_FRACTION)
        draw, count = np.random.default_rng(1), len(next(iter(rows.values())))
        timing = {b: {k: v[draw.integers(0, count, b)] for k, v in rows.items()} for b in BATCHES}
        return cls(name, model, CalibrationData(rows), fit, held_out, timing)


@dataclass
class Subject:
    """A model under test: its towers and, where it has one, its eval split."""

    name: str
    towers: dict[str, Tower]
    retrieval: dict | None = None  # query/<input>, item/<input>, relevance
    ranking: dict | None = None  # <input>..., label
    timed: bool = True


# --- models -------------------------------------------------------------------------------------------------
def exported(module):
    from graphs.export import tower_to_onnx
    from graphs.passes.manager import run_passes
    from toolkit.model.loading import LoadedTower

    return run_passes(tower_to_onnx(LoadedTower("tower", module.eval(), list(module.input_specs),
                                                list(module.output_names))))[0]  # fmt: skip


def trained(folder: Path, label: str) -> list[Subject]:
    """The two-tower and ranker `dcnc train` wrote into `folder`."""
    from toolkit.model.loading import load_model

    two_tower = load_model(str(folder / "two_tower.pt"))
    towers = {t: Tower.split(t, exported(tw.module), dict(np.load(folder / f"{t}_calib.npz")))
              for t, tw in two_tower.towers.items()}  # fmt: skip
    ranker = exported(load_model(str(folder / "ranker.pt")).towers["ranker"].module)
    return [
        Subject(f"{label} two-tower", towers, retrieval=dict(np.load(folder / "two_tower_eval.npz"))),
        Subject(f"{label} ranker", {"ranker": Tower.split("ranker", ranker, dict(np.load(folder / "ranker_calib.npz")))},
                ranking=dict(np.load(folder / "ranker_eval.npz"))),
    ]  # fmt: skip


def random_rows(model, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Zipf-distributed ids (a random order of each table's rows), standardised log-normal dense features."""
    tables = {init.name: init.dims[0] for init in model.graph.initializer if len(init.dims) == 2}
    lookups = {n.input[1]: tables[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph_inputs(model):
        shape = spec.concrete_shape(rows)
        if spec.dtype.startswith("int"):
            high = lookups[spec.name]
            feeds[spec.name] = rng.permutation(high)[np.minimum(rng.zipf(1.1, shape) - 1, high - 1)].astype(spec.dtype)
        else:
            raw = np.log1p(rng.lognormal(0.0, rng.uniform(0.5, 1.5, shape[-1]), shape))
            feeds[spec.name] = ((raw - raw.mean(axis=0)) / raw.std(axis=0)).astype(spec.dtype)
    return feeds


def compute_bound_spec():
    from toolkit.model.spec import CrossSpec, DenseFeature, SparseFeature, TowerSpec

    return TowerSpec(sparse=[SparseFeature(f"id_{i}", cardinality=10_000, dim=32) for i in range(12)],
                     dense=[DenseFeature("dense", dim=128)], cross=CrossSpec("full", layers=3),
                     deep=[1024, 512, 256], structure="parallel", out_dim=128)  # fmt: skip


def synthetic() -> list[Subject]:
    """The compute-bound tower and one zoo tower per cross kind, random weights and inputs."""
    import torch
    import zoo

    from toolkit.model.zoo.cross import CROSS_KINDS
    from toolkit.model.zoo.families import RetrievalTower

    torch.manual_seed(0)
    big = exported(RetrievalTower(compute_bound_spec()))
    subjects = [Subject("compute-bound tower", {"tower": Tower.split("tower", big, random_rows(big, 2048, 0))})]
    for kind in CROSS_KINDS:
        model = exported(zoo.zoo_model("retrieval", kind)[0].towers()["query"])
        subjects.append(Subject(f"zoo {kind}", {"query": Tower.split("query", model, random_rows(model, 2048, 0))},
                                timed=False))  # fmt: skip
    return subjects


# --- lowering and measuring ---------------------------------------------------------------------------------
def lower(subject: Subject, variant: Variant, target: float) -> tuple[dict, dict]:
    """Per tower: the variant's INT8 graph, and its search curve (for searched variants)."""
    graphs, curves = {}, {}
    embedding = sum(len(graph_outputs(tw.model)[0].shape) == 2 and graph_outputs(tw.model)[0].shape[1] != 1
                    for tw in subject.towers.values())  # fmt: skip
    for name, tw in subject.towers.items():
        if variant.name.startswith("default"):  # exactly what `dcnc build --precision int8 [--int8-isa]` does
            graphs[name], record = searched_int8(tw.model, tw.rows, name, isa=DEFAULTS[variant.name],
                                                 min_agreement=target, embedding_towers=embedding, timing_batch=256)  # fmt: skip
            curves[name] = record.search
            continue
        lowerer = Int8Lowerer(tw.model, tw.fit, "cpu", variant.method, isa=variant.isa)
        if variant.search:
            metric, key = held_out_metric(list(graph_outputs(tw.model)[0].shape))
            share = embedding if key.startswith("agreement") else 1
            graphs[name], *_, search = search_precision(lowerer, tw.held_out, metric, key, 1 - (1 - target) / share,
                                                        ladder=(variant.recipe,))  # fmt: skip
            curves[name] = search.to_dict()
        else:
            graphs[name] = lowerer.lower(variant.recipe)[0]
    return graphs, curves


def foreign(variant: Variant) -> bool:
    """The variant keeps more weight bits than this CPU's integer kernel takes (a VNNI build on AVX2): it is judged
    on its unfused Q/DQ graph, as `dcnc build` judges it (calibration.int8.Int8Lowerer.foreign_kernel), and not
    timed here."""
    from calibration.isa import detect_int8_isa, saturates_here

    return saturates_here(DEFAULTS.get(variant.name, variant.isa) or detect_int8_isa())


def judge(model, unfused: bool):
    from toolkit.backends.ort.loader import OrtOptions, ort_session

    return ort_session(model, options=OrtOptions(opt_level="disable")) if unfused else session(model)


def held_out_agreement(tower: Tower, reference: np.ndarray, model, unfused: bool = False) -> dict[str, float]:
    metric, _ = held_out_metric(list(graph_outputs(tower.model)[0].shape))
    return metric(reference, judge(model, unfused).run(None, tower.held_out)[0])


def evaluate(subject: Subject, graphs: dict, reference: dict | None = None, unfused: bool = False) -> dict:
    """Eval-split metrics of a variant (both towers of a two-tower lowered alike); with `reference` (FP32's
    result), agreement@K and recall ratio, or AUC and log-loss deltas, against it."""
    if subject.retrieval is not None:
        data = subject.retrieval
        side = {t: {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(f"{t}/")} for t in ("query", "item")}
        emb = {t: judge(graphs[t], unfused).run(None, side[t])[0] for t in ("query", "item")}
        top = metrics.exact_top_k(emb["query"], [emb["item"]], 100).ids
        recall = metrics.recall_at_k(top, data["relevance"], [100])[100]
        if reference is None:
            return {"top": top, "recall@100": recall}
        agreement = metrics.agreement_at_k(reference["top"], top, (1, 10, 100))
        return {f"agreement@{k}": v for k, v in agreement.items()} | {"recall@100 ratio": recall / reference["recall@100"]}
    if subject.ranking is not None:
        data = dict(subject.ranking)
        labels = data.pop("label")
        logits = judge(graphs["ranker"], unfused).run(None, data)[0]
        auc, logloss = metrics.auc(labels, logits), metrics.logloss(labels, logits)
        if reference is None:
            return {"auc": auc, "logloss": logloss}
        return {"auc delta": auc - reference["auc"], "logloss delta": logloss - reference["logloss"]}
    return {}


def speed(subject: Subject, models: dict[str, dict], iterations: dict[int, int]) -> dict:
    """Per tower and batch: FP32 median ms and each variant's speedup, FP32 / INT8 medians and (`<v> fastest`)
    fastest / fastest, one interleaved run."""
    from toolkit.backends.timing import time_interleaved

    result = {}
    for name, tw in subject.towers.items():
        sessions = {"fp32": session(tw.model)} | {v: session(g[name]) for v, g in models.items()}
        for batch, feeds in tw.timing.items():
            samples = time_interleaved({v: (lambda s=s, f=feeds: s.run(None, f)) for v, s in sessions.items()},
                                       warmup=3, iterations=iterations[batch])  # fmt: skip
            medians = {v: float(np.median(s)) for v, s in samples.items()}
            fastest = {v: float(np.min(s)) for v, s in samples.items()}  # the least disturbed run of each
            result[f"{name}@{batch}"] = {"fp32_ms": medians["fp32"]} | {v: medians["fp32"] / medians[v] for v in models}
            result[f"{name}@{batch}"] |= {f"{v} fastest": fastest["fp32"] / fastest[v] for v in models}
    return result


def clipping(tower: Tower) -> dict[str, list[dict]]:
    """Per calibration method: each Gemm input's chosen range, observed min/max and share of values clipped (the
    unsmoothed graph, as `--calib-method` calibrates it)."""
    from calibration.int8 import gemm_input_ranges

    result = {}
    for method in ("minmax", "entropy", "percentile"):
        graph, ranges, _, _ = Int8Lowerer(tower.model, tower.fit, "cpu", method, isa=VNNI).prepared(False)
        result[method] = gemm_input_ranges(graph, ranges)
    return result


def machine() -> str:
    from calibration.isa import detect_int8_isa
    from toolkit.core.machine import cpu_identity

    identity = cpu_identity()
    return f"{identity['cpu']}, {identity['cores']} cores, ISA {' '.join(identity['isa'])} (int8 level {detect_int8_isa()})"


def run_subject(subject: Subject, args) -> dict:
    print(f"== {subject.name}", flush=True)
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants]
    variants += [Variant(name) for name in DEFAULTS if not args.variants or name in args.variants]
    models, searches, refused = {}, {}, {}
    unfused = {v.name for v in variants if foreign(v)}
    for variant in variants:
        try:
            models[variant.name], curve = lower(subject, variant, args.target)
        except DcncError as err:  # the default build refuses a target it cannot meet: that is its result
            refused[variant.name] = str(err)
            print(f"  {variant.name:18s} refused: {err}", flush=True)
            continue
        if curve:
            searches[variant.name] = curve
    references = {t: session(tw.model).run(None, tw.held_out)[0] for t, tw in subject.towers.items()}
    fp32 = evaluate(subject, {t: tw.model for t, tw in subject.towers.items()})
    quality = {}
    for variant, graphs in models.items():
        judged = variant in unfused
        quality[variant] = {t: held_out_agreement(subject.towers[t], references[t], g, judged) for t, g in graphs.items()}
        quality[variant]["eval"] = evaluate(subject, graphs, fp32, judged)
        print(f"  {variant:18s} " + json.dumps(quality[variant], default=float), flush=True)
    result = {"quality": quality, "searches": searches, "refused": refused, "unfused": sorted(unfused)}
    if subject.name in ("example two-tower", "compute-bound tower"):
        result["clipping"] = clipping(next(iter(subject.towers.values())))
    if subject.timed and not args.no_speed:
        load = os.getloadavg()[0]
        compute = "compute" in subject.name
        timed = {v: g for v, g in models.items() if v not in unfused}
        result["speed"] = speed(subject, timed, {64: args.iterations * 10, 4096: max(5, args.iterations // (4 if compute else 1))})
        result["load"] = [load, os.getloadavg()[0]]
        for key, entry in result["speed"].items():
            print(f"  speed {key}: " + " ".join(f"{k} {v:.2f}" for k, v in entry.items() if "fastest" not in k), flush=True)
        if compute:
            tower = subject.towers["tower"]
            result["counting"] = {v: counting(tower.model, timed[v]["tower"], tower.timing[4096]) for v in ("R+S", "default")
                                  if v in timed}  # fmt: skip
            print("  counting " + json.dumps(result["counting"]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=Path("runs/example"), help="`dcnc train` output (synthetic)")
    parser.add_argument("--movielens", type=Path, default=Path("runs/ml"), help="`dcnc train --dataset movielens` output")
    parser.add_argument("--only", nargs="*", default=[], help="models whose name contains one of these words")
    parser.add_argument("--variants", nargs="*", default=[], help="variant names (default: all, and default)")
    parser.add_argument("--target", type=float, default=DEFAULT_MIN_AGREEMENT, help="held-out agreement for M and default")
    parser.add_argument("--iterations", type=int, default=40, help="timed rounds at batch 4096 (x10 at 64)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    args = parser.parse_args()
    print(f"machine: {machine()}; onnxruntime CPU, sequential executor, intra-op threads = cores", flush=True)
    subjects = trained(args.example, "example") + trained(args.movielens, "movielens") + synthetic()
    subjects = [s for s in subjects if not args.only or any(w in s.name for w in args.only)]
    report = {"machine": machine(), "target": args.target, "subjects": {s.name: run_subject(s, args) for s in subjects}}
    if args.out:
        from toolkit.core.fileio import write_json

        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
