"""The local engine of `dcnc embed`: items streamed through one runner in this process into Parquet shards.

Memory holds one input batch, its outputs and the Parquet reader's current row group, whatever the item count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.commands.embed.items import ItemSource, batch_feeds, outputs_table
from toolkit.commands.embed.output import PARQUET_WRITE
from toolkit.core.progress import StepBar
from toolkit.evaluate.verify import run_batched


class ShardWriter:
    """Output tables appended into part-00000.parquet, part-00001.parquet, ... of at most `shard_rows` rows each."""

    def __init__(self, folder: Path, shard_rows: int):
        self.folder, self.shard_rows = folder, shard_rows
        self.writer: Any = None
        self.shards = 0
        self.in_shard = 0

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        while table.num_rows:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.folder / f"part-{self.shards:05d}.parquet", table.schema, **PARQUET_WRITE)
                self.shards += 1
            head, table = table.slice(0, self.shard_rows - self.in_shard), table.slice(self.shard_rows - self.in_shard)
            self.writer.write_table(head)
            self.in_shard += head.num_rows
            if self.in_shard == self.shard_rows:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer, self.in_shard = None, 0


def fixed_batches(runner: Any, feeds: dict, batch: int) -> dict:
    """The runner's outputs for at most `batch` rows, run as exactly `batch` rows (the rest padded and cut off), so
    an item's embedding never depends on how many rows it was batched with, in any engine."""
    (outputs,) = run_batched(runner, feeds, batch, (batch, batch))
    return outputs


def embed_local(source: ItemSource, runner: Any, batch: int, folder: Path, shard_rows: int, progress: bool) -> int:
    """Embed every item of `source` with the active `runner` into shards under `folder`; the rows written."""
    done = 0
    writer = ShardWriter(folder, shard_rows)
    with StepBar(-(-source.rows // batch), enabled=progress, label="embed") as bar:
        try:
            for record in source.batches(batch):
                bar.advance(f"embedding rows {done:,}-{done + record.num_rows:,} of {source.rows:,}")
                ids, feeds = batch_feeds(record, source.specs, source.id_column, str(source.path))
                writer.write(outputs_table(source.id_column, ids, fixed_batches(runner, feeds, batch)))
                done += record.num_rows
        finally:
            writer.close()
    return done
