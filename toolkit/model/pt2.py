"""Reading a `torch.export` program (`.pt2`) so that nothing in the file runs: only tensors are ever unpickled.

torch.export.load unpickles parts of the archive with `weights_only=False` (pickled weights and constants, and
the sample inputs when their weights-only load fails), unpickles "opaque" constants with plain pickle, and loads
AOTInductor / ExecuTorch code stored in it. A pickle can run any code, so:

- archives holding compiled code (data/aotinductor, data/executorch, data/mtia) or non-tensor constants (script
  or opaque objects) are refused before torch reads them;
- the load itself runs under torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, which turns every torch.load inside
  it, the sample inputs' fallback included, into a weights-only load (tensors, containers, numbers, strings);
- a pickle that holds anything else is refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from toolkit.core.errors import DcncError, first_line

CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
REFUSED = "dcnc reads only its graph and tensors (nothing in a model file may run)"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in the block is weights-only, even where the caller asked for weights_only=False."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def refuse_code(path: Path) -> None:
    """Refuse an archive that carries code or objects other than tensors, reading only its file list and configs."""
    from torch.export.pt2_archive._package import PT2ArchiveReader
    from torch.export.pt2_archive.constants import CONSTANTS_DIR, TENSOR_CONSTANT_FILENAME_PREFIX

    try:
        reader = PT2ArchiveReader(str(path))
        names = reader.get_file_names()
    except Exception:  # not this torch's archive format (an older zip, or no zip): torch.export.load judges it
        return
    code = next((n for n in names if n.startswith(CODE_DIRS)), None)
    if code is not None:
        raise DcncError(f"{path}: refusing it: it holds compiled code ({code}); {REFUSED}")
    for name in names:
        if name.startswith(CONSTANTS_DIR) and name.endswith("_config.json"):
            try:
                entries = json.loads(reader.read_string(name)).get("config", {})
            except (ValueError, AttributeError, RuntimeError):
                raise DcncError(f"{path}: not a readable torch.export program ({name} is no constants table)") from None
            for fqn, meta in entries.items():
                stored = meta.get("path_name", "") if isinstance(meta, dict) else ""
                if not str(stored).startswith(TENSOR_CONSTANT_FILENAME_PREFIX):
                    raise DcncError(f"{path}: refusing it: constant {fqn!r} is a pickled object ({stored}); {REFUSED}")


def load_program(path: Path) -> torch.export.ExportedProgram:
    """The program in `path`, loaded so that nothing in it runs (see the module docstring); DcncError in one line
    for a file that is not a program or that carries more than a graph and tensors."""
    refuse_code(path)
    try:
        with weights_only_loads():
            return torch.export.load(path)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        reason = next((line for line in lines if "WeightsUnpickler error" in line), first_line(err))
        reason = reason.split("WeightsUnpickler error: ")[-1].split(" was not an allowed")[0].strip()
        raise DcncError(
            f"{path}: refusing it: it holds pickled objects other than tensors ({reason[:200]}); {REFUSED}"
        ) from None
    except Exception as err:
        raise DcncError(f"{path}: not a readable torch.export program ({first_line(err)[:300]})") from None
