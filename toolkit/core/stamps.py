"""Hash-keyed stage stamps of `dcnc run`: a stage is skipped when what it reads hashes as before and what it
wrote is still there, byte for byte.

A stamp is a small JSON file beside the stage's output: the sha256 key of the stage's inputs (source file
hashes, the stage's options, upstream outputs' hashes, the dcnc version) and the sha256 of each output. Its
`inputs` are kept readable in the stamp, so a user can see why a stage ran again. A stage about to run removes
its stamp first, so an interrupted stage is never taken for current.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.core.errors import DcncError
from toolkit.core.fileio import sha256_tree, write_json

SCHEMA = "dcnc.stamp/1"


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents); DcncError if it is missing."""
    if not path.exists():
        raise DcncError(f"{path}: not found")
    return sha256_tree(path)


@dataclass
class Stage:
    """One stage of one model or target: the stamp file, what it reads (`inputs`, JSON-able) and what it writes
    (`outputs`: name -> file or directory)."""

    label: str
    stamp: Path
    inputs: dict[str, Any]
    outputs: dict[str, Path]

    @property
    def key(self) -> str:
        made_from = {"dcnc": __version__, "stage": self.label, "inputs": self.inputs}
        return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()

    def current(self) -> dict[str, str] | None:
        """The recorded output hashes if the stamp's key matches and every output still hashes as recorded."""
        try:
            stamp = json.loads(self.stamp.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stamp, dict) or stamp.get("schema") != SCHEMA or stamp.get("key") != self.key:
            return None
        recorded = stamp.get("outputs")
        if not isinstance(recorded, dict) or set(recorded) != set(self.outputs):
            return None
        for name, path in self.outputs.items():
            if not path.exists() or sha256_tree(path) != recorded[name]:
                return None
        return recorded

    def invalidate(self) -> None:
        """Forget the stamp before the stage rewrites its outputs."""
        self.stamp.unlink(missing_ok=True)

    def record(self, seconds: float) -> dict[str, str]:
        """Hash the outputs and write the stamp (atomically); the output hashes."""
        outputs = {name: content_hash(path) for name, path in self.outputs.items()}
        stamp = {"schema": SCHEMA, "stage": self.label, "key": self.key, "dcnc": __version__,
                 "inputs": self.inputs, "outputs": outputs, "seconds": round(seconds, 3)}
        write_json(self.stamp, stamp, sort_keys=True)
        return outputs
