"""dcnc checkpoints: spec + state_dict + dcnc version in one file, loaded with torch.load(weights_only=True)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from toolkit import __version__
from toolkit.core.errors import DcncError, first_line
from toolkit.core.fileio import atomic_write_bytes
from toolkit.model.spec import ModelSpec
from toolkit.model.zoo.families import build_model

FORMAT = "dcnc.checkpoint/1"


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | Path, extra: dict | None = None) -> None:
    """Write the checkpoint atomically. `extra` holds plain data only (numbers, strings, lists, dicts)."""
    payload = {
        "format": FORMAT,
        "dcnc_version": __version__,
        "spec": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict:
    """The raw payload, checked for format; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise DcncError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways (a truncated one with OSError EINVAL, too)
        raise DcncError(f"{path}: not a readable dcnc checkpoint ({first_line(err)[:300]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DcncError(f"{path}: not a dcnc checkpoint (expected format {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild the model from its spec and load its weights, strictly: every tensor present, every shape equal."""
    payload = read_checkpoint(path)
    spec = ModelSpec.from_dict(payload["spec"], where=f"{path}: spec")
    model = build_model(spec)
    state = payload["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DcncError(
            f"{path}: state_dict does not match its spec (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DcncError(
                f"{path}: state_dict does not match its spec: {key} has shape {tuple(state[key].shape)},"
                f" the spec gives {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)
    return model.eval(), spec, payload.get("extra", {})
