"""The corpus pass of `dcnc verify --corpus`: every item through the reference and the bundle's item tower,
searched against both sides' query embeddings shard by shard, in this process (LocalScan) or in Ray actors
that each search the share of the corpus Ray Data streams to them, merged k-way on the driver (RayScan)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.commands.embed.command import EngineOptions
from toolkit.commands.embed.items import ItemSource, batch_feeds, open_items
from toolkit.commands.embed.local import fixed_batches
from toolkit.core.errors import DcncError
from toolkit.core.progress import StepBar
from toolkit.evaluate.corpus import CorpusPartial, SearchSpec, merge_partials

TOWER = "item"


def scan_batches(
    batches: Iterable[Any], source: dict[str, Any], reference: Any, candidate: Any, search: SearchSpec, batch: int,
    bar: StepBar | None = None,
) -> CorpusPartial:  # fmt: skip
    """One worker's share: each Arrow batch of items through both sides (at exactly `batch` rows), then searched."""
    import pyarrow as pa

    found = search.new()
    for table in batches:
        ids, feeds = batch_feeds(table, source["specs"], source["id_column"], source["where"])
        if not pa.types.is_integer(ids.type):
            raise DcncError(f"{source['where']}: id column {source['id_column']!r} is {ids.type}; verify --corpus needs integer item ids")
        if bar is not None:
            bar.advance(f"embedding and searching items ({found.rows:,} done)")
        found.add(ids.to_numpy().astype(np.int64), fixed_batches(reference, feeds, batch), fixed_batches(candidate, feeds, batch))
    return found.partial()


@dataclass
class LocalScan:
    """The corpus run through verify's own runners in this process, one batch at a time."""

    items: str | Path
    options: EngineOptions = field(default_factory=EngineOptions)
    id_column: str = "id"
    source: ItemSource | None = None
    rows: int = 0

    @property
    def label(self) -> str:
        return f"{self.items} (local engine)"

    def open(self, specs: list[Any]) -> None:
        self.source = open_items(self.items, specs, self.id_column)
        self.rows = self.source.rows

    def sample(self, rows: int) -> dict[str, np.ndarray]:
        return batch_feeds(next(self.source.batches(rows)), self.source.specs, self.id_column, str(self.items))[1]

    def described(self) -> dict[str, Any]:
        return {"specs": self.source.specs, "id_column": self.id_column, "where": str(self.items)}

    def batch(self, candidate: Any) -> int:
        low, high = getattr(candidate, "batch_range", None) or (1, 4096)
        batch = self.options.batch_size or high
        if not low <= batch <= high:
            raise DcncError(f"--batch-size {batch}: the bundle was built for batches {low}..{high}")
        return batch

    def __call__(self, reference: Any, candidate: Any, search: SearchSpec) -> CorpusPartial:
        batch = self.batch(candidate)
        with StepBar(-(-self.rows // batch), enabled=self.options.progress, label="corpus") as bar:
            return scan_batches(self.source.batches(batch), self.described(), reference, candidate, search, batch, bar)


@dataclass(frozen=True)
class ItemTowers:
    """How a Ray actor opens the same two item-tower runners verify compares: the reference as `dcnc verify`
    loaded it, the bundle's tower (under half emulation where verify judges it so)."""

    reference: str
    inputs: tuple[str, ...]
    weights: str | None
    bundle: str
    device: str

    def open(self, threads: int) -> tuple[Any, Any]:
        import torch

        from toolkit.backends.bundle import check_bundle, tower_runner
        from toolkit.backends.torch_runner import TorchRunner
        from toolkit.evaluate.verify import emulated_runners
        from toolkit.model.loading import SignedTower, load_model

        torch.set_num_threads(threads)
        loaded = load_model(self.reference, list(self.inputs) or None, self.weights)
        manifest = check_bundle(self.bundle)
        emulated = emulated_runners(Path(self.bundle), manifest, self.device, [TOWER]) or {}
        candidate = emulated.get(TOWER) or tower_runner(self.bundle, manifest, TOWER, threads)
        return TorchRunner(SignedTower(loaded.towers[TOWER]), self.device, name=f"torch:{TOWER}"), candidate


class CorpusWorker:
    """A Ray actor: opens both item-tower runners once, then embeds and searches the split it is handed."""

    def __init__(self, towers: ItemTowers, source: dict[str, Any], search: SearchSpec, batch: int, threads: int):
        self.source, self.search, self.batch = source, search, batch
        self.reference, self.candidate = towers.open(threads)
        self.reference.activate()
        self.candidate.activate()

    def scan(self, split: Any) -> CorpusPartial:
        batches = split.iter_batches(batch_size=self.batch, batch_format="pyarrow")
        return scan_batches(batches, self.source, self.reference, self.candidate, self.search, self.batch)


@dataclass
class RayScan(LocalScan):
    """The corpus on Ray: Ray Data reads it and streams disjoint shares to `concurrency` CorpusWorker actors; each
    returns its K best per query and its parity sums, merged k-way here."""

    towers: ItemTowers | None = None

    @property
    def label(self) -> str:
        return f"{self.items} (ray engine)"

    def __call__(self, reference: Any, candidate: Any, search: SearchSpec) -> CorpusPartial:
        from toolkit.commands.embed.on_ray import (
            actor_plan,
            item_dataset,
            one_line_failures,
            ray_cluster,
        )

        batch = self.batch(candidate)
        gpu_bundle = self.towers.device == "cuda"
        with ray_cluster(self.options.address, self.options.progress) as ray:
            plan = actor_plan(ray, self.options.concurrency, self.options.num_gpus, gpu_bundle)
            splits = item_dataset(ray, self.source).streaming_split(plan.concurrency)
            worker = ray.remote(num_cpus=plan.cpus, num_gpus=plan.gpus)(CorpusWorker)
            workers = [worker.remote(self.towers, self.described(), search, batch, plan.cpus) for _ in splits]
            try:
                with one_line_failures(ray, None, "the corpus pass"):
                    partials = ray.get([w.scan.remote(split) for w, split in zip(workers, splits)])
            finally:  # a failed pass's traceback still references the actors: free their CPUs and GPUs now
                for actor in workers:
                    ray.kill(actor)
            return merge_partials(partials, search.k)


def corpus_scan(
    items: str | Path, options: EngineOptions, id_column: str, reference: str, inputs: list[str] | None,
    weights: str | None, bundle: str, device: str,
) -> LocalScan:  # fmt: skip
    """The scan `dcnc verify --corpus ITEMS --engine ...` runs: local, or on Ray with actors that open the same
    reference and bundle towers verify compares."""
    from toolkit.commands.embed.command import require_engine

    require_engine(options)
    if options.engine == "local":
        return LocalScan(items, options, id_column)
    towers = ItemTowers(str(reference), tuple(inputs or ()), None if weights is None else str(weights), str(bundle), device)
    return RayScan(items, options, id_column, towers=towers)
