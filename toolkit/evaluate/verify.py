"""Verify a candidate against its reference, runner by runner, on the same evaluation data, and decide parity.

Retrieval models: the queries and the whole item corpus are embedded by both sides; items stream through in
chunks into exact top-K (faiss), so only the K best per query are ever kept. Ranking models: AUC and log loss of
each labelled output on both sides. Always: elementwise parity per output, interleaved latency per batch size,
and the gates (toolkit.evaluate.gates) that turn all of it into pass or fail.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from toolkit.backends.timing import device_call, timer_for
from toolkit.core.errors import DcncError
from toolkit.core.machine import MachineLoad, machine_info
from toolkit.core.onnxio import load_onnx
from toolkit.core.progress import StepBar
from toolkit.evaluate import metrics
from toolkit.evaluate.corpus import SearchSpec, dense_codes
from toolkit.evaluate.evaldata import (
    CorpusEval,
    NumericEval,
    RankingEval,
    RetrievalEval,
)
from toolkit.evaluate.gates import (
    Thresholds,
    baseline_gates,
    evaluate_gates,
)
from toolkit.evaluate.latency import NOISE_METHOD, LatencyPolicy, compare_latency
from toolkit.evaluate.parity import ParityAccumulator
from toolkit.evaluate.result import Report


class Runner(Protocol):
    """What verify needs of a runner (toolkit.backends.base.Runner has it): infer on numpy feeds."""

    def infer(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class VerifyOptions:
    """ks: the K of recall@K / agreement@K. batch_sizes: latency batch sizes (those outside the bundle's batch
    profile are skipped). eval_batch: rows per inference call over the evaluation data. item_chunk: items per
    top-K chunk. warmup / iterations: untimed and timed rounds per batch size (more are added while the
    speedup's interval is wider than `policy` allows). latency: measure it at all. threads: intra-op threads of
    both sides while timing (default: the cores other work leaves free at the start). progress: a progress bar."""

    ks: tuple[int, ...] = (1, 10, 100)
    batch_sizes: tuple[int, ...] = (1, 64, 512)
    eval_batch: int = 1024
    item_chunk: int = 65536
    warmup: int = 10
    iterations: int = 50
    latency: bool = True
    policy: LatencyPolicy = field(default_factory=LatencyPolicy)
    threads: int | None = None
    progress: bool = False  # a progress bar on stderr over corpus embedding and the latency sweep


def _rows(feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: array[start:stop] for name, array in feeds.items()}


def run_batched(
    runner: Runner, feeds: dict[str, np.ndarray], batch: int, batch_range: tuple[int, int] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Outputs for consecutive row blocks of at most `batch` rows; a block below the runner's minimum batch is
    padded by repeating its last row and the padding cut off again."""
    rows = len(next(iter(feeds.values())))
    low = batch_range[0] if batch_range else 1
    for start in range(0, rows, batch):
        block = _rows(feeds, start, min(start + batch, rows))
        size = len(next(iter(block.values())))
        if size < low:
            block = {n: np.concatenate([a, np.repeat(a[-1:], low - size, axis=0)]) for n, a in block.items()}
        outputs = runner.infer(block)
        yield {name: np.asarray(value)[:size] for name, value in outputs.items()}


def _check_outputs(outputs: dict[str, np.ndarray], expected: list[str], side: str, tower: str) -> None:
    missing = [n for n in expected if n not in outputs]
    if missing:
        raise DcncError(f"{side} tower {tower!r} returns {list(outputs)}, not the reference outputs {expected}")


def _concat(parts: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in names}


def _by_k(values: dict[int, float]) -> dict[str, float]:
    """JSON object keys are strings."""
    return {str(k): v for k, v in values.items()}


class _Pair:
    """Reference and candidate runner of one tower, run on the same rows, with parity accumulated per output."""

    def __init__(
        self, tower: str, reference: Runner, candidate: Runner, outputs: list[str], eval_batch: int,
        timed: Runner | None = None,
    ):  # fmt: skip
        self.tower, self.reference, self.candidate, self.outputs = tower, reference, candidate, outputs
        self.timed = timed or candidate  # what latency is measured on, when answers come from an emulation
        batch_range = getattr(candidate, "batch_range", None)
        self.batch_range = batch_range
        self.eval_batch = min(eval_batch, batch_range[1]) if batch_range else eval_batch
        self.parity = {name: ParityAccumulator() for name in outputs}

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Both sides' outputs for all rows of `feeds`, concatenated; parity updated."""
        ref_parts, cand_parts = [], []
        for ref, cand in zip(run_batched(self.reference, feeds, self.eval_batch, self.batch_range),
                             run_batched(self.candidate, feeds, self.eval_batch, self.batch_range)):
            _check_outputs(ref, self.outputs, "reference", self.tower)
            _check_outputs(cand, self.outputs, "candidate", self.tower)
            for name in self.outputs:
                self.parity[name].update(ref[name], cand[name])
            ref_parts.append(ref)
            cand_parts.append(cand)
        return _concat(ref_parts, self.outputs), _concat(cand_parts, self.outputs)

    def parity_report(self) -> dict[str, dict[str, Any]]:
        return {f"{self.tower}/{name}": acc.result() for name, acc in self.parity.items()}


def _embed_queries(
    pair: _Pair, data: RetrievalEval | CorpusEval, ks: tuple[int, ...], bar: StepBar
) -> tuple[dict[str, np.ndarray], int, tuple[int, ...]]:
    """Both sides' query embeddings, the K searched and the Ks reported (all below the corpus size: verify_runners
    refuses a K as large as the corpus, where recall and agreement are 1 whatever the bundle ranks)."""
    bar.advance("embedding queries")
    query_ref, query_cand = pair.run(data.queries)
    embedding = pair.outputs[0]
    queries = {"reference": query_ref[embedding], "candidate": query_cand[embedding]}
    return queries, max(ks), tuple(sorted(set(ks)))


def evaluate_retrieval(
    pairs: dict[str, _Pair], data: RetrievalEval, ks: tuple[int, ...], item_chunk: int, bar: StepBar | None = None
) -> dict[str, Any]:
    """Embed queries and items on both sides, exact top-K of each side, recall@K against relevance, agreement@K."""
    bar = bar or StepBar(0, enabled=False)
    queries, k_max, ks = _embed_queries(pairs["query"], data, ks, bar)
    search_ref = metrics.TopKSearch(queries["reference"], k_max)
    search_cand = metrics.TopKSearch(queries["candidate"], k_max)
    item_embedding = pairs["item"].outputs[0]
    for start in range(0, data.num_items, item_chunk):
        bar.advance(f"embedding items {start:,}-{min(start + item_chunk, data.num_items):,} of {data.num_items:,}")
        item_ref, item_cand = pairs["item"].run(_rows(data.items, start, start + item_chunk))
        search_ref.add(item_ref[item_embedding])
        search_cand.add(item_cand[item_embedding])
    top_ref, top_cand = search_ref.result(), search_cand.result()
    return {
        "queries": data.num_queries,
        "items": data.num_items,
        "relevant_pairs": int(len(data.relevance)),
        **retrieval_figures(top_ref.ids, top_cand.ids, data.relevance, ks),
    }


def ratio_resolution(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The smallest recall-ratio change the data resolves: two standard errors of the mean per-query recall
    difference (paired, so only queries whose hits changed count), relative to the reference's recall. A few
    queries trading one hit each way at K = 1 (measured on the example's INT8 two-tower: 4 lost, 2 gained of
    1995, ratio 0.973 at 1.2 standard errors) is chance; the same loss over many queries is not."""
    if reference.mean() <= 0:
        return 1.0
    diff = candidate - reference
    return float(2.0 * diff.std(ddof=1) / np.sqrt(len(diff)) / reference.mean()) if len(diff) > 1 else 1.0


def retrieval_figures(
    top_ref: np.ndarray, top_cand: np.ndarray, relevance: np.ndarray, ks: tuple[int, ...]
) -> dict[str, Any]:
    """recall@K of each side's top-K item lists against relevance, their ratio and its resolution, agreement@K."""
    per_ref = metrics.recall_per_query(top_ref, relevance, ks)
    per_cand = metrics.recall_per_query(top_cand, relevance, ks)
    recall_ref = {k: float(np.mean(v)) for k, v in per_ref.items()}
    recall_cand = {k: float(np.mean(v)) for k, v in per_cand.items()}
    ratio = {k: recall_cand[k] / recall_ref[k] if recall_ref[k] > 0 else float(recall_cand[k] == 0) for k in ks}
    agreement = metrics.agreement_at_k(top_ref, top_cand, ks)
    resolution = {k: ratio_resolution(per_ref[k], per_cand[k]) for k in ks}
    return {
        "recall": {"reference": _by_k(recall_ref), "candidate": _by_k(recall_cand)},
        "recall_ratio": _by_k(ratio),
        "recall_ratio_resolution": _by_k(resolution),
        "agreement": _by_k(agreement),
    }


def evaluate_corpus_retrieval(
    pairs: dict[str, _Pair], data: CorpusEval, ks: tuple[int, ...], bar: StepBar | None = None
) -> dict[str, Any]:
    """As evaluate_retrieval, over a corpus the scan runs shard by shard (here or on Ray workers): per-shard exact
    top-K merged k-way, item parity merged into the item pair's."""
    bar = bar or StepBar(0, enabled=False)
    queries, k_max, ks = _embed_queries(pairs["query"], data, ks, bar)
    relevant = np.unique(data.relevance[:, 1])
    search = SearchSpec(queries, k_max, pairs["item"].outputs, relevant)
    bar.advance(f"embedding and searching {data.num_items:,} corpus items")
    found = data.scan(pairs["item"].reference, pairs["item"].candidate, search)
    for name, accumulator in found.parity.items():
        pairs["item"].parity[name].merge(accumulator)
    missing = relevant[~found.relevant_seen]
    if missing.size:
        raise DcncError(f"relevance names item id {missing[0]}, which the corpus {data.corpus} does not hold ({missing.size} such ids)")
    relevance, top = dense_codes(data.relevance, found.top)
    return {
        "queries": data.num_queries,
        "items": found.rows,
        "corpus": data.corpus,
        "relevant_pairs": int(len(data.relevance)),
        **retrieval_figures(top["reference"], top["candidate"], relevance, ks),
    }


def evaluate_ranking(pair: _Pair, data: RankingEval) -> dict[str, Any]:
    """AUC and log loss (from logits) of both sides for each labelled output, and candidate minus reference."""
    ref, cand = pair.run(data.feeds)
    outputs = {}
    for name, labels in data.labels.items():
        entry = {}
        for metric, fn in (("auc", metrics.auc), ("logloss", metrics.logloss)):
            r, c = fn(labels, ref[name]), fn(labels, cand[name])
            entry[metric] = {"reference": r, "candidate": c, "diff": c - r}
        outputs[name] = entry
    return {"rows": data.num_rows, "outputs": outputs}


def measure_latency(
    pairs: dict[str, _Pair], feeds: dict[str, dict[str, np.ndarray]], options: VerifyOptions, device: str,
    bar: StepBar | None = None, load: MachineLoad | None = None,
) -> dict[str, Any]:
    """Paired reference/candidate timing per tower and batch size, on rows of the evaluation data; `load` is
    the machine's at the start (recorded, and named when a figure is inconclusive)."""
    bar = bar or StepBar(0, enabled=False)
    timer = timer_for(device)
    towers = {}
    for tower, pair in pairs.items():
        low, high = pair.batch_range or (1, max(options.batch_sizes))
        sizes = [b for b in options.batch_sizes if low <= b <= high]
        rows = len(next(iter(feeds[tower].values())))
        calls: dict[str, dict[int, Any]] = {"reference": {}, "candidate": {}}
        for batch in sizes:
            take = np.arange(batch) % rows  # the first rows, repeated when the data has fewer
            feed = {name: np.ascontiguousarray(array[take]) for name, array in feeds[tower].items()}
            calls["reference"][batch] = device_call(pair.reference, feed, device)
            calls["candidate"][batch] = device_call(pair.timed, feed, device)
        bar.advance(f"timing {tower} at batch {', '.join(map(str, sizes))}")
        towers[tower] = compare_latency(calls["reference"], calls["candidate"], options.warmup, options.iterations,
                                        timer, options.policy)  # fmt: skip
    return {
        "device": device,
        "timer": "cuda_events" if device == "cuda" else "wall_clock",
        "warmup": options.warmup,
        "iterations": options.iterations,
        "policy": dataclasses.asdict(options.policy),
        "load": load.to_dict() if load is not None else None,
        "noise_method": NOISE_METHOD,
        "towers": towers,
    }


def verify_runners(
    reference: dict[str, Runner],
    candidate: dict[str, Runner],
    output_names: dict[str, list[str]],
    data: RetrievalEval | RankingEval | CorpusEval | NumericEval,
    thresholds: Thresholds,
    options: VerifyOptions | None = None,
    device: str = "cpu",
    baseline: dict[str, Any] | None = None,
    names: dict[str, str] | None = None,
    timed: dict[str, Runner] | None = None,
    load: MachineLoad | None = None,
) -> Report:
    """Compare active runners tower by tower (reference and candidate share tower names) and gate the result.

    names: "reference", "candidate", "precision", "data", "emulation", "reference_math" shown in the report.
    baseline: an earlier report whose latency this run must not regress beyond its own noise. timed: the runners
    latency is measured on, when `candidate` answers through an emulation of them (default: the candidates).
    load: the machine's at the start, recorded with the latency.
    """
    options = options or VerifyOptions()
    names = names or {}
    if set(reference) != set(candidate):
        raise DcncError(f"the bundle has towers {sorted(candidate)}, the reference {sorted(reference)}")
    start = time.perf_counter()
    timed = timed or {}
    pairs = {
        t: _Pair(t, reference[t], candidate[t], output_names[t], options.eval_batch, timed.get(t)) for t in reference
    }
    retrieval = ranking = latency = None
    retrieving = isinstance(data, RetrievalEval)
    scanning = isinstance(data, CorpusEval)
    if (retrieving or scanning) and max(options.ks) >= data.num_items:
        raise DcncError(
            f"--k {max(options.ks)}: not below the corpus of {data.num_items} items, where recall@K and agreement@K"
            f" are 1 whatever the bundle ranks; give K values below {data.num_items}"
        )
    steps = (1 + -(-data.num_items // options.item_chunk) if retrieving else 2 if scanning else 1) + (
        len(pairs) if options.latency else 0
    )
    with StepBar(steps, enabled=options.progress, label="verify") as bar:
        if retrieving:
            retrieval = evaluate_retrieval(pairs, data, options.ks, options.item_chunk, bar)
            latency_feeds = {"query": data.queries, "item": data.items}
        elif scanning:
            retrieval = evaluate_corpus_retrieval(pairs, data, options.ks, bar)
            latency_feeds = {"query": data.queries, "item": data.scan.sample(max(options.batch_sizes))}
        elif isinstance(data, RankingEval):
            (pair,) = pairs.values()
            bar.advance("scoring the evaluation rows")
            ranking = evaluate_ranking(pair, data)
            latency_feeds = {pair.tower: data.feeds}
        else:
            bar.advance("comparing outputs")
            for tower, pair in pairs.items():
                pair.run(data.feeds[tower])
            latency_feeds = data.feeds
        if options.latency:
            latency = measure_latency(pairs, latency_feeds, options, device, bar, load)
    parity = {key: stats for pair in pairs.values() for key, stats in pair.parity_report().items()}
    gates = evaluate_gates(thresholds, parity, retrieval, ranking, latency)
    if baseline is not None:
        if latency is None:
            raise DcncError("--baseline compares latency, which this run did not measure")
        gates += baseline_gates(latency, baseline, thresholds.latency_tolerance)
    return Report(
        reference=names.get("reference", "reference"),
        candidate=names.get("candidate", "candidate"),
        precision=names.get("precision", "fp32"),
        device=device,
        gates=gates,
        parity=parity,
        retrieval=retrieval,
        ranking=ranking,
        latency=latency,
        thresholds=dataclasses.asdict(thresholds),
        data=names.get("data", ""),
        emulation=names.get("emulation"),
        reference_math=names.get("reference_math"),
        quality_absent=data.why if isinstance(data, NumericEval) else None,
        seconds=time.perf_counter() - start,
        machine=machine_info(device),
    )


def emulated_runners(bundle: Path, manifest: Any, device: str, towers: list[str] | None = None) -> dict[str, Runner] | None:
    """For half-precision graphs run by ONNX Runtime's CPU provider, which casts around its missing FP16 kernels
    and so computes in FP32 (DESIGN.md decision 1): runners over the same graphs (of `towers`, default all) under
    half emulation, so parity and recall are those of a GPU. None for other bundles and on CUDA."""
    from graphs.emulation import emulated_half_session
    from toolkit.backends.ort.runner import OrtRunner

    if device != "cpu" or manifest.precision not in ("fp16", "bf16") or manifest.backend not in ("ort", "ort-cuda"):
        return None
    return {
        tower: OrtRunner(
            emulated_half_session(load_onnx(Path(bundle) / entry.onnx), manifest.precision),
            name=f"emulated-{manifest.precision}:{tower}", batch_range=manifest.batch_range(),
        )
        for tower, entry in manifest.towers.items() if towers is None or tower in towers
    }
