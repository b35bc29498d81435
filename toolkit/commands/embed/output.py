"""The output folder of `dcnc embed`: keyed (a rerun on the same inputs is a no-op), staged and renamed into place
whole, and its manifest.

DIR/manifest.json (schema dcnc.embed/1) and DIR/shards/*.parquet (id, then each tower output as float32), so
`pandas.read_parquet("DIR/shards")` or `ray.data.read_parquet("DIR/shards")` reads every row. The folder is written
beside DIR under a hidden name and renamed to DIR only when complete; the staging folder of a run that was killed
(SIGKILL, a lost node) names its host and process, and the next run removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.core.errors import DcncError
from toolkit.core.fileio import atomic_dir, sha256_file

SCHEMA = "dcnc.embed/1"
MANIFEST = "manifest.json"
SHARDS = "shards"
OWNER = ".dcnc-embed-owner"  # in a staging folder while its run is alive: {"host", "pid"}
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders of `out` left by runs on this host whose process is gone; the folders removed."""
    removed = []
    for folder in map(Path, glob.glob(str(out.parent / f".{glob.escape(out.name)}.*.tmp"))):
        try:
            owner = json.loads((folder / OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or a run that has not written its owner yet
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging folder that replaces `out` when the block completes (and is removed if it raises)."""
    with contextlib.ExitStack() as stack:
        try:
            staging = stack.enter_context(atomic_dir(out, force=True))
            (staging / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            (staging / SHARDS).mkdir()
        except OSError as err:  # a read-only file system, a parent that is a file
            raise DcncError(f"{out}: cannot write it ({err.strerror})") from None
        yield staging
        (staging / OWNER).unlink()


def write_manifest(staging: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Hash and count every shard into `record`, and write it as the staged folder's manifest.json."""
    import pyarrow.parquet as pq

    shards = []
    for file in sorted((staging / SHARDS).glob("*.parquet")):
        shards.append({"file": f"{SHARDS}/{file.name}", "rows": pq.read_metadata(file).num_rows, "sha256": sha256_file(file)})
    manifest = {"schema": SCHEMA, "dcnc": __version__, **record, "shards": shards}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
