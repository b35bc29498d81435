"""The PyTorch reference runner: the original tower module in eval + inference mode, on CPU or CUDA, in full FP32."""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.backends.base import InputMeta, Runner
from toolkit.core.errors import DcncError

# What the reference computes, for reports: the bundles' FP32 is judged against IEEE FP32, not TF32.
REFERENCE_MATH = "torch reference in full FP32 (TF32 off for its matmuls)"


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """Float32 matmuls on CUDA in IEEE FP32 (TF32 off) while inside; the caller's setting is restored after.

    A process may have turned TF32 on (torch.set_float32_matmul_precision("high"), a library, a notebook): the
    reference must not then round its inputs to TF32's 10-bit mantissas, or an FP32 bundle would be judged
    against a TF32 answer. On CPU the setting changes nothing.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; reading the legacy flag after it is set can raise
        saved = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:  # pragma: no cover - torch < 2.9
        saved = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in eval mode on `device`: itself when its tensors are there already, else a copy moved there, so
    a module shared with other runners (a CPU and a GPU runner of one tower) is never moved under them."""
    if all(t.device == device for t in [*module.parameters(), *module.buffers()]):
        return module.eval()
    return copy.deepcopy(module).eval().to(device)


class TorchRunner(Runner):
    """Runs a dcnc tower module (one with `input_specs` and `output_names`) on numpy feeds.

    Args:
        module: the tower. It is run in eval mode under torch.inference_mode(), in full FP32 (full_fp32_matmuls),
            on `device`; when its weights are elsewhere the runner runs a copy on `device` (see on_device).
        device: "cpu" (default) or "cuda" / "cuda:N".
        name: the runner's name (default "torch").
    """

    kind = "torch"

    def __init__(self, module: nn.Module, device: str = "cpu", name: str | None = None):
        super().__init__(name)
        for attribute in ("input_specs", "output_names"):
            if not hasattr(module, attribute):
                raise DcncError(f"{type(module).__name__} is not a dcnc tower: it has no `{attribute}`")
        self.source = module
        self.module = module  # what runs: `source`, or its copy on `device` once active
        self.device = torch.device(device)

    def activate_impl(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DcncError(f"torch runner on {self.device}: torch sees no CUDA device (install a CUDA build of torch)")
        self.module = on_device(self.source, self.device)

    def deactivate_impl(self) -> None:
        self.module = self.source

    def input_metadata_impl(self) -> list[tuple[str, InputMeta]]:
        return [(s.name, InputMeta(np.dtype(s.dtype), tuple(s.shape))) for s in self.module.input_specs]

    def _tensors(self, feed_dict: dict[str, np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(feed_dict[s.name])).to(self.device) for s in self.module.input_specs]

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        tensors = self._tensors(feed_dict)
        with torch.inference_mode(), full_fp32_matmuls():
            outputs = self.module(*tensors)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return OrderedDict(
            (name, out.detach().cpu().numpy()) for name, out in zip(self.module.output_names, outputs, strict=True)
        )

    def device_call(self, feed_dict: dict[str, np.ndarray]):
        """A zero-argument call running the module on `feed_dict` already on the device (for timing on CUDA)."""
        self._require_active("device_call")
        tensors, module = self._tensors(feed_dict), self.module

        def call():
            with torch.inference_mode(), full_fp32_matmuls():
                return module(*tensors)

        return call


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
