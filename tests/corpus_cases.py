"""A corpus-scale case shared by the embed and corpus-verify tests: a small dcnc two-tower checkpoint, its ORT fp32
bundle, a 200k-item synthetic corpus as a folder of Parquet files, and evaluation queries whose relevance names
corpus item ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import tiny_two_tower_spec

from toolkit.commands.build import build_bundle
from toolkit.commands.export import export_model
from toolkit.core.signature import random_inputs
from toolkit.model.checkpoint import save_checkpoint
from toolkit.model.loading import load_model
from toolkit.model.zoo.families import build_model

ITEMS = 200_000
QUERIES = 64
BATCH = (1, 1024, 4096)


def item_ids(rows: int) -> np.ndarray:
    """Sparse, large, shuffled ids, as a catalogue's are (not row numbers)."""
    return np.random.default_rng(7).permutation(rows).astype(np.int64) * 1009 + 10**9


def items_table(features: dict[str, np.ndarray], ids: np.ndarray):
    """The items as an Arrow table: id, then one column per input (fixed-size lists for vectors)."""
    import pyarrow as pa

    from toolkit.commands.embed.items import to_arrow

    return pa.table({"id": pa.array(ids), **{name: to_arrow(array) for name, array in features.items()}})


def write_items(folder: Path, features: dict[str, np.ndarray], ids: np.ndarray, files: int = 3) -> Path:
    """The corpus as `files` Parquet files of 20k-row row groups in `folder`."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = items_table(features, ids)
    step = -(-len(ids) // files)
    for n, start in enumerate(range(0, len(ids), step)):
        pq.write_table(table.slice(start, step), folder / f"items-{n}.parquet", row_group_size=20_000)
    return folder


def build_corpus_case(root: Path) -> Path:
    """root/model.pt, root/bundle (ORT fp32, batch 1..4096), root/items/ (200k items), root/eval.npz."""
    spec = tiny_two_tower_spec()
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_checkpoint(model, spec, root / "model.pt")
    export_model(load_model(str(root / "model.pt")), root / "onnx", validate=False)
    build_bundle(root / "onnx", root / "bundle", batch=BATCH)
    ids = item_ids(ITEMS)
    items = random_inputs(model.item.input_specs, ITEMS, seed=2)
    write_items(root / "items", items, ids)
    queries = random_inputs(model.query.input_specs, QUERIES, seed=1)
    np.savez(root / "eval.npz", relevance=relevance_near(model, queries, items, ids),
             **{f"query/{k}": v for k, v in queries.items()})  # fmt: skip
    return root


def relevance_near(model, queries: dict, items: dict, ids: np.ndarray) -> np.ndarray:
    """Per query 3 items from its model top-300 and 2 at random, so recall@K is neither 0 nor 1 and tells a
    mixed-up id from a right one."""
    with torch.inference_mode():
        query = model.query(*(torch.from_numpy(queries[s.name]) for s in model.query.input_specs)).numpy()
        item = model.item(*(torch.from_numpy(items[s.name]) for s in model.item.input_specs)).numpy()
    near = np.argsort(-(query @ item.T), axis=1)[:, :300]
    rng = np.random.default_rng(3)
    pairs = [(q, ids[near[q, r]]) for q in range(len(query)) for r in rng.choice(300, 3, replace=False)]
    pairs += [(q, ids[rng.integers(len(ids))]) for q in range(len(query)) for _ in range(2)]
    return np.array(pairs, dtype=np.int64)
