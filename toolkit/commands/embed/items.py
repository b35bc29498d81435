"""Items to embed: a Parquet file or folder (streamed batch by batch) or an .npz, checked against a tower's inputs.

Parquet: one column per tower input, named as the input. A [B] input is a plain column of its dtype; a [B, d, ...]
input is a fixed-size list column of d*... values of its dtype (row-major). An id column (default `id`) is carried
to the output. A folder means every *.parquet file under it, read in sorted order; names starting with "." or "_"
are skipped, as pyarrow and Ray Data skip them (Spark's _SUCCESS, hidden files). An .npz holds arrays keyed by
input name and is loaded whole; its id array is optional (row numbers otherwise).

Checks run where they are cheap: names, types and widths from the Parquet footers before anything is embedded;
nulls, NaN/Inf and ids outside an embedding table batch by batch, as the rows are read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.errors import DcncError, first_line
from toolkit.core.fileio import sha256_file
from toolkit.core.npz import check_array, check_feeds, load_npz
from toolkit.core.signature import TensorSpec

SKIPPED_PREFIXES = (".", "_")


def bundle_input_specs(bundle: str | Path, manifest: Any, tower: str) -> list[TensorSpec]:
    """The tower's inputs as the bundle's graph declares them, with the id bounds (embedding table sizes) that
    `dcnc export` recorded in its metadata, so an id past its table is refused rather than looked up."""
    from toolkit.core.onnxio import get_metadata, graph_inputs, load_onnx

    model = load_onnx(Path(bundle) / manifest.towers[tower].onnx, external_data=False)
    highs = {spec.name: spec.high for spec in map(TensorSpec.parse, get_metadata(model, "dcnc.inputs") or [])}
    specs = [replace(spec, high=highs.get(spec.name)) for spec in graph_inputs(model)]
    for spec in specs:
        if any(isinstance(d, str) for d in spec.shape[1:]):
            raise DcncError(f"{bundle}: tower {tower!r} input {spec} has dynamic dims besides the batch; embed needs fixed widths")
    return specs


def arrow_type(spec: TensorSpec):
    """The Parquet/Arrow column type that holds `spec`: its dtype for [B], a fixed-size list of it otherwise."""
    import pyarrow as pa

    value = pa.from_numpy_dtype(np.dtype(spec.dtype))
    return value if len(spec.shape) == 1 else pa.list_(value, math.prod(spec.shape[1:]))


def type_name(arrow_type: Any) -> str:
    """An Arrow type as messages show it, list child names left out: fixed_size_list<float>[8], list<double>."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arrow_type):
        return f"fixed_size_list<{arrow_type.value_type}>[{arrow_type.list_size}]"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"list<{arrow_type.value_type}>"
    return str(arrow_type)


@dataclass
class ItemSource:
    """Checked items: the Parquet files (streamed) or the .npz as an in-memory table, and their row count."""

    path: Path
    specs: list[TensorSpec]
    id_column: str
    rows: int
    files: list[Path]  # Parquet files, sorted; empty for an .npz
    table: Any = None  # pyarrow.Table of an .npz; None for Parquet

    @property
    def columns(self) -> list[str]:
        return [self.id_column, *(s.name for s in self.specs if s.name != self.id_column)]

    def batches(self, rows: int) -> Iterator[Any]:
        """pyarrow RecordBatches of at most `rows` rows, in order; a Parquet file is read a row group at a time."""
        import pyarrow.parquet as pq

        if self.table is not None:
            yield from self.table.to_batches(max_chunksize=rows)
            return
        for file in self.files:
            with pq.ParquetFile(file) as parquet:
                yield from parquet.iter_batches(batch_size=rows, columns=self.columns)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every file read, by path relative to ITEMS (what the output's key is made from)."""
        if self.table is not None:
            return {self.path.name: sha256_file(self.path)}
        return {str(f.relative_to(self.path)) if self.path.is_dir() else f.name: sha256_file(f) for f in self.files}


def open_items(path: str | Path, specs: list[TensorSpec], id_column: str = "id") -> ItemSource:
    """Check ITEMS against the tower's `specs` (names, types, widths; an .npz's values too) and count its rows."""
    path = Path(path)
    if not path.exists():
        raise DcncError(f"{path}: no such file or folder (ITEMS is a Parquet file or folder, or an .npz)")
    if path.is_file() and path.suffix == ".npz":
        return _npz_items(path, specs, id_column)
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*.parquet")
            if f.is_file() and not any(part.startswith(SKIPPED_PREFIXES) for part in f.relative_to(path).parts)
        )  # fmt: skip
        if not files:
            raise DcncError(f"{path}: no *.parquet files in this folder")
    elif path.suffix == ".parquet":
        files = [path]
    else:
        raise DcncError(f"{path}: ITEMS must be a Parquet file or folder, or an .npz")
    rows = sum(_check_parquet(file, specs, id_column) for file in files)
    if rows == 0:
        raise DcncError(f"{path}: no rows (the corpus is empty)")
    return ItemSource(path, specs, id_column, rows, files)


def _check_parquet(file: Path, specs: list[TensorSpec], id_column: str) -> int:
    """One file's columns against the specs, from its footer alone; its row count."""
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(file) as parquet:
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise DcncError(f"{file}: not a readable Parquet file ({first_line(err)})") from None
    if id_column not in schema.names:
        raise DcncError(f"{file}: no id column {id_column!r} (columns: {schema.names}); name yours with --id-column")
    for spec in specs:
        if spec.name not in schema.names:
            raise DcncError(f"{file}: no column {spec.name!r} for the tower's input {spec} (columns: {schema.names})")
        found, wanted = schema.field(spec.name).type, arrow_type(spec)
        if found != wanted:
            raise DcncError(f"{file}: column {spec.name!r} is {type_name(found)}; the tower's input {spec} needs {type_name(wanted)}")
    return rows


def _npz_items(path: Path, specs: list[TensorSpec], id_column: str) -> ItemSource:
    import pyarrow as pa

    arrays = load_npz(path)
    feeds = {spec.name: arrays[spec.name] for spec in specs if spec.name in arrays}
    rows = check_feeds(feeds, specs, str(path))
    ids = arrays.get(id_column, np.arange(rows, dtype=np.int64))
    if ids.shape != (rows,):
        raise DcncError(f"{path}: id array {id_column!r} has shape {list(ids.shape)}, expected [{rows}]")
    columns = {id_column: pa.array(ids), **{s.name: to_arrow(feeds[s.name]) for s in specs if s.name != id_column}}
    return ItemSource(path, specs, id_column, rows, [], pa.table(columns))


def to_arrow(array: np.ndarray):
    """A numpy [B] or [B, d, ...] array as an Arrow column (fixed-size lists of the row-major values)."""
    import pyarrow as pa

    if array.ndim == 1:
        return pa.array(array)
    width = math.prod(array.shape[1:])
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), width)


def _column(batch: Any, name: str):
    column = batch.column(name)
    return column.combine_chunks() if hasattr(column, "combine_chunks") else column


def batch_feeds(batch: Any, specs: list[TensorSpec], id_column: str, where: str) -> tuple[Any, dict[str, np.ndarray]]:
    """The ids (an Arrow array) and checked numpy feeds of one RecordBatch or Table of items.

    Raises DcncError naming `where` and the batch's first and last id on nulls, NaN/Inf or an id past its table.
    """
    ids = _column(batch, id_column)
    first, last = (ids[0].as_py(), ids[-1].as_py()) if len(ids) else (None, None)
    where = f"{where} (the batch of ids {first}..{last})"
    if ids.null_count:
        raise DcncError(f"{where}: id column {id_column!r} holds {ids.null_count} nulls")
    feeds = {}
    for spec in specs:
        column = _column(batch, spec.name)
        values = column if len(spec.shape) == 1 else column.flatten()
        nulls = column.null_count + (values.null_count if values is not column else 0)
        if nulls:
            raise DcncError(f"{where}: {spec.name!r} holds {nulls} nulls")
        # a copy where Arrow lends read-only memory: torch refuses to wrap it without a warning
        array = values.to_numpy(zero_copy_only=False, writable=True).reshape(len(column), *spec.shape[1:])
        check_array(array, spec, where)
        feeds[spec.name] = array
    return ids, feeds


def outputs_table(id_column: str, ids: Any, outputs: dict[str, np.ndarray]):
    """The output rows: the ids, then each tower output as float32 ([B] plain, [B, d] a fixed-size list)."""
    import pyarrow as pa

    columns = {id_column: ids}
    for name, values in outputs.items():
        columns[name] = to_arrow(np.asarray(values, dtype=np.float32))
    return pa.table(columns)
