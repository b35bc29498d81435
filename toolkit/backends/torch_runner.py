"""The PyTorch reference runner: the original tower module in eval + inference mode, on CPU or CUDA."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.backends.base import InputMeta, Runner
from toolkit.core.errors import DcncError


class TorchRunner(Runner):
    """Runs a dcnc tower module (one with `input_specs` and `output_names`) on numpy feeds.

    Args:
        module: the tower; it is put in eval mode and run under torch.inference_mode().
        device: "cpu" (default) or "cuda" / "cuda:N".
        name: the runner's name (default "torch").
    """

    kind = "torch"

    def __init__(self, module: nn.Module, device: str = "cpu", name: str | None = None):
        super().__init__(name)
        for attribute in ("input_specs", "output_names"):
            if not hasattr(module, attribute):
                raise DcncError(f"{type(module).__name__} is not a dcnc tower: it has no `{attribute}`")
        self.module = module
        self.device = torch.device(device)

    def activate_impl(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DcncError(f"torch runner on {self.device}: torch sees no CUDA device (install a CUDA build of torch)")
        self.module.eval().to(self.device)

    def input_metadata_impl(self) -> list[tuple[str, InputMeta]]:
        return [(s.name, InputMeta(np.dtype(s.dtype), tuple(s.shape))) for s in self.module.input_specs]

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(feed_dict[s.name])).to(self.device) for s in self.module.input_specs]
        with torch.inference_mode():
            outputs = self.module(*tensors)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return OrderedDict(
            (name, out.detach().cpu().numpy()) for name, out in zip(self.module.output_names, outputs, strict=True)
        )


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_runners(checkpoint: str | Path, device: str = "cpu") -> dict[str, TorchRunner]:
    """One TorchRunner per tower of the model in a dcnc checkpoint, named `torch:<tower>`."""
    from toolkit.model.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(checkpoint)
    return {name: TorchRunner(tower, device, name=f"torch:{name}") for name, tower in model.towers().items()}
