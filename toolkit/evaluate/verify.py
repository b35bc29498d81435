"""`dcnc verify`: run the PyTorch reference and a built bundle on the same evaluation data and decide parity.

Retrieval models: the queries and the whole item corpus are embedded by both sides; items stream through in
chunks into exact top-K (faiss), so only the K best per query are ever kept. Ranking models: AUC and log loss of
each labelled output on both sides. Always: elementwise parity per output, interleaved latency per batch size,
and the gates (toolkit.evaluate.gates) that turn all of it into pass or fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from toolkit.backends.latency import __doc__ as latency_doc
from toolkit.backends.latency import compare_latency, device_call, timer_for
from toolkit.core.errors import DcncError
from toolkit.core.machine import machine_info
from toolkit.core.onnxio import load_onnx
from toolkit.core.progress import StepBar
from toolkit.evaluate import metrics
from toolkit.evaluate.corpus import CorpusScan, SearchSpec, dense_codes
from toolkit.evaluate.evaldata import CorpusEval, RankingEval, RetrievalEval, load_corpus_eval, load_eval
from toolkit.evaluate.gates import (
    Thresholds,
    baseline_gates,
    evaluate_gates,
    load_baseline,
    resolve_thresholds,
)
from toolkit.report.verify import Report


class Runner(Protocol):
    """What verify needs of a runner (toolkit.backends.base.Runner has it): infer on numpy feeds."""

    def infer(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class VerifyOptions:
    """ks: the K of recall@K / agreement@K. batch_sizes: latency batch sizes (those outside the bundle's batch
    profile are skipped). eval_batch: rows per inference call over the evaluation data. item_chunk: items per
    top-K chunk. warmup / iterations: untimed and timed rounds per batch size. latency: measure it at all.
    progress: show a progress bar."""

    ks: tuple[int, ...] = (1, 10, 100)
    batch_sizes: tuple[int, ...] = (1, 64, 512)
    eval_batch: int = 1024
    item_chunk: int = 65536
    warmup: int = 10
    iterations: int = 50
    latency: bool = True
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
        self.parity = {name: metrics.ParityAccumulator() for name in outputs}

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
    """Both sides' query embeddings, the K searched (no more than the items) and the Ks reported."""
    bar.advance("embedding queries")
    query_ref, query_cand = pair.run(data.queries)
    embedding = pair.outputs[0]
    k_max = min(max(ks), data.num_items)
    queries = {"reference": query_ref[embedding], "candidate": query_cand[embedding]}
    return queries, k_max, tuple(sorted({min(k, k_max) for k in ks}))


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


def retrieval_figures(
    top_ref: np.ndarray, top_cand: np.ndarray, relevance: np.ndarray, ks: tuple[int, ...]
) -> dict[str, Any]:
    """recall@K of each side's top-K item lists against relevance, their ratio and its resolution, agreement@K."""
    recall_ref = metrics.recall_at_k(top_ref, relevance, ks)
    recall_cand = metrics.recall_at_k(top_cand, relevance, ks)
    ratio = {k: recall_cand[k] / recall_ref[k] if recall_ref[k] > 0 else float(recall_cand[k] == 0) for k in ks}
    agreement = metrics.agreement_at_k(top_ref, top_cand, ks)
    # The smallest step of the recall ratio: one hit at a query with a single relevant item.
    judged = len(np.unique(relevance[:, 0]))
    resolution = {k: 1.0 / (judged * recall_ref[k]) if recall_ref[k] > 0 else 1.0 for k in ks}
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
    bar: StepBar | None = None,
) -> dict[str, Any]:
    """Interleaved reference/candidate timing per tower and batch size, on rows of the evaluation data."""
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
        towers[tower] = compare_latency(calls["reference"], calls["candidate"], options.warmup, options.iterations, timer)
    return {
        "device": device,
        "timer": "cuda_events" if device == "cuda" else "wall_clock",
        "warmup": options.warmup,
        "iterations": options.iterations,
        "noise_method": " ".join(latency_doc.split("Noise:", 1)[1].split()),
        "towers": towers,
    }


def verify_runners(
    reference: dict[str, Runner],
    candidate: dict[str, Runner],
    output_names: dict[str, list[str]],
    data: RetrievalEval | RankingEval | CorpusEval,
    thresholds: Thresholds,
    options: VerifyOptions | None = None,
    device: str = "cpu",
    baseline: dict[str, Any] | None = None,
    names: dict[str, str] | None = None,
    timed: dict[str, Runner] | None = None,
) -> Report:
    """Compare active runners tower by tower (reference and candidate share tower names) and gate the result.

    names: "reference", "candidate", "precision", "data", "emulation" shown in the report. baseline: an earlier
    report whose latency this run must not regress beyond its own noise. timed: the runners latency is
    measured on, when `candidate` answers through an emulation of them (default: the candidates).
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
        else:
            (pair,) = pairs.values()
            bar.advance("scoring the evaluation rows")
            ranking = evaluate_ranking(pair, data)
            latency_feeds = {pair.tower: data.feeds}
        if options.latency:
            latency = measure_latency(pairs, latency_feeds, options, device, bar)
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
        seconds=time.perf_counter() - start,
        machine=machine_info(device),
    )


class SignedTower(nn.Module):
    """A loaded tower as TorchRunner takes it: the user's module with the signature loading found for it
    (a factory's module need not carry `input_specs` itself)."""

    def __init__(self, tower: Any) -> None:
        super().__init__()
        self.inner = tower.module
        self.input_specs = tower.input_specs
        self.output_names = list(tower.output_names)

    def forward(self, *inputs: Any) -> Any:
        return self.inner(*inputs)


def _branch_timing(bundle: Path, manifest: Any, batch: int) -> dict[str, Any]:
    """t_cross, t_deep, t_parallel per tower from the bundle's ONNX branch subgraphs, or why they were skipped."""
    from graphs.branches import time_branches

    result = {}
    for tower, entry in manifest.towers.items():
        try:
            result[tower] = time_branches(load_onnx(bundle / entry.onnx), batch=batch)
        except DcncError as err:  # not a parallel tower: nothing to time
            result[tower] = {"skipped": str(err)}
    return result


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


def verify(
    reference: str | Path,
    bundle: str | Path,
    data: str | Path | None = None,
    device: str = "cpu",
    options: VerifyOptions | None = None,
    gates_file: str | Path | None = None,
    overrides: dict[str, float | None] | None = None,
    baseline: str | Path | None = None,
    branches: bool = True,
    inputs: list[str] | None = None,
    weights: str | Path | None = None,
    corpus: CorpusScan | None = None,
) -> Report:
    """Verify the bundle at `bundle` against the model `reference` (anything `dcnc export` loads; a factory with
    its `inputs` NAME:DTYPE:SHAPE strings and `weights` state_dict, as `dcnc export` takes them).

    data: evaluation .npz (toolkit.evaluate.evaldata formats); default: the evaluation split the reference names, if any.
    device: "cpu" or "cuda" (both sides run and are timed there). gates_file / overrides: thresholds on top of
    the defaults for the bundle's precision. baseline: an earlier report (JSON) to compare latency against.
    branches: also time the cross and deep branch subgraphs of parallel towers (CPU only).
    corpus: a retrieval model's items come from this scan of a corpus (toolkit.commands.embed.corpus_pass), and
    `data` gives the queries and relevance naming corpus item ids.
    """
    from toolkit.backends.bundle import check_bundle, tower_runner
    from toolkit.backends.torch_runner import TorchRunner
    from toolkit.model.loading import load_model

    options = options or VerifyOptions()
    if device not in ("cpu", "cuda"):
        raise DcncError(f"--device must be cpu or cuda, got {device!r}")
    baseline_report = load_baseline(baseline) if baseline is not None else None
    manifest = check_bundle(bundle)
    built_for = manifest.device.get("kind", "cpu")
    if built_for != device:
        raise DcncError(f"{bundle}: built for {built_for} ({manifest.backend} backend); verify it with --device {built_for}")
    thresholds = resolve_thresholds(manifest.precision, gates_file, overrides)
    loaded = load_model(str(reference), inputs, str(weights) if weights is not None else None)
    if data is None:
        data = getattr(loaded, "eval_data", None)
        if data is None:
            raise DcncError(f"{reference}: names no evaluation data; pass --data EVAL.npz")
    towers = loaded.towers
    if len(towers) == 1 and len(manifest.towers) == 1:  # one tower each: the file's stem named the bundle's
        towers = {next(iter(manifest.towers)): next(iter(towers.values()))}
    specs = {t: tw.input_specs for t, tw in towers.items()}
    if corpus is not None:
        evaluation = load_corpus_eval(data, specs, corpus, corpus.label)
    else:
        evaluation = load_eval(data, specs, {t: list(tw.output_names) for t, tw in towers.items()})
    reference_runners = {t: TorchRunner(SignedTower(tw), device, name=f"torch:{t}") for t, tw in towers.items()}
    bundle_runners = {t: tower_runner(bundle, manifest, t) for t in manifest.towers}
    emulated = emulated_runners(Path(bundle), manifest, device)
    names = {"reference": str(reference), "candidate": str(bundle), "precision": manifest.precision,
             "data": str(data) if corpus is None else f"{data} (queries), {corpus.label} (items)"}
    if emulated:
        names["emulation"] = (
            f"{manifest.precision} answers computed under half emulation on CPU (every half tensor rounded as a GPU"
            " rounds it); latency measured on the bundle as built"
        )
    with contextlib.ExitStack() as stack:
        for runner in [*reference_runners.values(), *bundle_runners.values(), *(emulated or {}).values()]:
            stack.enter_context(runner)
        report = verify_runners(
            reference_runners, emulated or bundle_runners, {t: list(tw.output_names) for t, tw in towers.items()},
            evaluation, thresholds, options, device, baseline_report, names=names, timed=bundle_runners,
        )
    if report.latency is not None and branches and device == "cpu":
        report.latency["branches"] = _branch_timing(Path(bundle), manifest, max(options.batch_sizes))
    return report
