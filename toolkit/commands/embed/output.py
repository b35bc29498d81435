"""The output folder of `dcnc embed`: keyed (a rerun on the same inputs is a no-op), staged and renamed into place
whole, and its manifest.

DIR/manifest.json (schema dcnc.embed/1) and DIR/shards/*.parquet (id, then each tower output as float32), so
`pandas.read_parquet("DIR/shards")` or `ray.data.read_parquet("DIR/shards")` reads every row. The folder is written
beside DIR under a hidden name and renamed to DIR only when complete (toolkit.core.fileio.atomic_dir: one writer at
a time holds DIR's lock, and the next writer removes the staging folder of a run that was killed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.core import fileio
from toolkit.core.fileio import atomic_dir, sha256_file

SCHEMA = "dcnc.embed/1"
MANIFEST = "manifest.json"
SHARDS = "shards"
# pyarrow's ParquetWriter settings for shards: dense float embeddings gain nothing from dictionary encoding, which
# made writing 6x slower than the tower itself here and the files 1.5x larger (measured on 64-d float32 rows).
PARQUET_WRITE = {"use_dictionary": False}


def output_key(made_from: dict[str, Any]) -> str:
    """sha256 of what the embeddings depend on (bundle, tower, item files, id column, batch size, dcnc version)."""
    return hashlib.sha256(json.dumps({"dcnc": __version__, **made_from}, sort_keys=True).encode()).hexdigest()


def current_output(out: Path, key: str) -> dict[str, Any] | None:
    """The manifest of `out` if it was made with this key and every shard still hashes as recorded."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or manifest.get("key") != key:
        return None
    for shard in manifest.get("shards", []):
        file = out / shard["file"]
        if not file.is_file() or sha256_file(file) != shard["sha256"]:
            return None
    return manifest


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging folder that replaces `out` when the block completes (and is removed if it raises)."""
    with atomic_dir(out, force=True) as staging:
        (staging / SHARDS).mkdir()
        yield staging


def write_manifest(staging: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Hash and count every shard into `record`, and write it as the staged folder's manifest.json."""
    import pyarrow.parquet as pq

    shards = []
    for file in sorted((staging / SHARDS).glob("*.parquet")):
        shards.append({"file": f"{SHARDS}/{file.name}", "rows": pq.read_metadata(file).num_rows, "sha256": sha256_file(file)})
    manifest = {"schema": SCHEMA, "dcnc": __version__, **record, "shards": shards}
    fileio.write_all(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
