"""`dcnc embed`: one tower of a bundle over every item of a corpus, into Parquet shards and a manifest, in this
process or on a Ray cluster."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.commands.embed.items import bundle_input_specs, open_items
from toolkit.commands.embed.local import embed_local
from toolkit.commands.embed.on_ray import embed_on_ray, require_ray
from toolkit.commands.embed.output import (
    MANIFEST,
    SHARDS,
    current_output,
    output_key,
    staged_output,
    write_manifest,
)
from toolkit.core.errors import DcncError
from toolkit.core.fileio import sha256_file
from toolkit.core.paths import DIR, check_outputs, output

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions:
    """Where and how items are embedded.

    engine: "local" (this process, its ORT session on every usable core) or "ray" (Ray Data actors).
    address: the Ray cluster to join ("auto", "ray://head:10001"); default: start a local one (ray only).
    batch_size: rows per inference call; default the bundle's largest profile batch. Every call runs at exactly
        this many rows (the last block padded), so an item's embedding never depends on its neighbours.
    concurrency: Ray actors; default one per GPU for GPU bundles, else one per CPU but one.
    num_gpus: GPUs per Ray actor (fractions pack several actors on a GPU); default 1 for GPU bundles, 0 for CPU.
    progress: a progress bar on stderr (the local engine's, or Ray Data's).
    """

    engine: str = "local"
    address: str | None = None
    batch_size: int | None = None
    concurrency: int | None = None
    num_gpus: float | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise DcncError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.engine == "local" and (self.address or self.concurrency or self.num_gpus):
            raise DcncError("--address, --concurrency and --num-gpus are for --engine ray")
        if self.batch_size is not None and self.batch_size < 1:
            raise DcncError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise DcncError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise DcncError(f"--num-gpus {self.num_gpus}: must be 0 or more")

    def batch_for(self, bundle: str | Path, manifest: Any) -> int:
        """The batch size to run: the option, or the bundle's largest profile batch; refused outside the profile."""
        low, high = manifest.batch_range()
        batch = self.batch_size or high
        if not low <= batch <= high:
            raise DcncError(f"--batch-size {batch}: {bundle} was built for batches {low}..{high}")
        return batch


def require_engine(options: EngineOptions) -> None:
    """Fail at once, before any item is read, when the engine cannot run here."""
    if options.engine == "ray":
        require_ray()


def embed(
    bundle: str | Path,
    items: str | Path,
    out: str | Path,
    tower: str = "item",
    options: EngineOptions | None = None,
    id_column: str = "id",
    shard_rows: int = 1_000_000,
    force: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Embed every item of ITEMS with the bundle's `tower` into OUT; (the output's manifest, whether it was
    already current, so nothing ran).

    OUT is keyed by the bundle, the tower, the item files' contents, the id column and the batch size: the same
    again is a no-op; anything else in OUT is replaced only with `force`. OUT appears whole or not at all.
    """
    from toolkit.backends.bundle import load_manifest

    options = options or EngineOptions()
    if shard_rows < 1:
        raise DcncError(f"--shard-rows {shard_rows}: must be at least 1")
    bundle, out = Path(bundle), Path(out)
    check_outputs([output(out, "--out", DIR, replace=True)], [bundle, items])  # same inputs again: a no-op
    require_engine(options)
    manifest = load_manifest(bundle)  # the runtime and device checks run where the runner opens: here or in actors
    if tower not in manifest.towers:
        raise DcncError(f"{bundle}: no tower {tower!r} (it has {sorted(manifest.towers)}); choose one with --tower")
    outputs = [o["name"] for o in manifest.towers[tower].outputs]
    if id_column in outputs:
        raise DcncError(f"--id-column {id_column!r} is also the name of a tower output; name the id column otherwise")
    batch = options.batch_for(bundle, manifest)
    source = open_items(items, bundle_input_specs(bundle, manifest, tower), id_column)
    made_from = {"bundle": sha256_file(bundle / MANIFEST), "tower": tower, "items": source.fingerprint(),
                 "id_column": id_column, "batch": batch}  # fmt: skip
    key = output_key(made_from)
    recorded = current_output(out, key)
    if recorded is not None:
        return recorded, True
    if out.exists() and not force:
        raise DcncError(f"{out}: already exists and was not made from these inputs (pass --force to replace it)")
    gpu_bundle = manifest.device.get("kind") == "cuda"
    with staged_output(out) as staging:
        start = time.perf_counter()  # from opening the runner (or starting Ray) to the last shard written
        if options.engine == "local":
            engine = run_local(source, bundle, manifest, tower, batch, staging / SHARDS, shard_rows, options.progress)
        else:
            engine = embed_on_ray(source, bundle, tower, gpu_bundle, batch, staging / SHARDS, shard_rows,
                                  options.address, options.concurrency, options.num_gpus, options.progress)  # fmt: skip
        seconds = time.perf_counter() - start
        record = write_manifest(staging, {
            "key": key,
            "bundle": {"path": str(bundle), "manifest_sha256": made_from["bundle"], "backend": manifest.backend,
                       "precision": manifest.precision},
            "tower": tower,
            "items": {"path": str(items), "files": made_from["items"]},
            "id_column": id_column,
            "outputs": manifest.towers[tower].outputs,
            "rows": source.rows,
            "engine": {"name": options.engine, "batch_size": batch, **engine},
            "seconds": round(seconds, 3),
            "items_per_s": round(source.rows / max(seconds, 1e-9), 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })  # fmt: skip
        written = sum(shard["rows"] for shard in record["shards"])
        if written != source.rows:
            raise DcncError(f"{out}: the engine wrote {written:,} rows of {source.rows:,} items; nothing was kept")
    return record, False


def run_local(source, bundle: Path, manifest: Any, tower: str, batch: int, folder: Path, shard_rows: int,
              progress: bool) -> dict[str, Any]:  # fmt: skip
    """The local engine with the bundle's runner (after the runtime and device checks); the settings used."""
    from toolkit.backends.bundle import check_bundle, tower_runner
    from toolkit.core.machine import usable_cores

    check_bundle(bundle)
    with tower_runner(bundle, manifest, tower) as runner:
        embed_local(source, runner, batch, folder, shard_rows, progress)
    return {"threads": manifest.options.get("ort", {}).get("threads") or usable_cores()}
