"""The ONNX Runtime runner: CPU sessions run plainly; CUDA sessions use I/O binding and, if enabled, CUDA graphs."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from toolkit.backends.base import InputMeta, Runner, batch_of
from toolkit.backends.ort.loader import (
    CUDA_PROVIDER,
    SessionFromOnnx,
    captures_cuda_graphs,
)
from toolkit.core.errors import DcncError

# ONNX Runtime's type strings -> numpy dtypes, for the inputs dcnc towers take.
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class OrtRunner(Runner):
    """Runs an ONNX Runtime session.

    Args:
        session: an onnxruntime.InferenceSession, or a loader (e.g. SessionFromOnnx) called on activate.
        name: the runner's name (default "ort").
        batch_range: (min, max) batch sizes accepted (default: any).
    """

    kind = "ort"

    def __init__(self, session, name: str | None = None, batch_range: tuple[int, int] | None = None):
        super().__init__(name, batch_range)
        self._session = session
        self.session = None
        self.uses_cuda = False
        self.cuda_graph = False
        self._graphs: dict[int, _CapturedBatch] = {}

    def activate_impl(self) -> None:
        self.session = self._session() if callable(self._session) else self._session
        self.uses_cuda = self.session.get_providers()[0] == CUDA_PROVIDER
        if self.uses_cuda:
            self.cuda_graph = captures_cuda_graphs(self.session)
            self.device_id = int(self.session.get_provider_options()[CUDA_PROVIDER].get("device_id", 0))

    def deactivate_impl(self) -> None:
        self.session = None
        self._graphs = {}

    def input_metadata_impl(self) -> list[tuple[str, InputMeta]]:
        metadata = []
        for node in self.session.get_inputs():
            if node.type not in ORT_TYPES:
                raise DcncError(f"{self.name}: input {node.name} has type {node.type}, which dcnc does not feed")
            shape = tuple(d if isinstance(d, int) else str(d) for d in node.shape)
            metadata.append((node.name, InputMeta(np.dtype(ORT_TYPES[node.type]), shape)))
        return metadata

    def output_names(self) -> list[str]:
        return [node.name for node in self.session.get_outputs()]

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        if not self.uses_cuda:
            outputs = self.session.run(None, dict(feed_dict))
            return OrderedDict(zip(self.output_names(), outputs, strict=True))
        if self.cuda_graph:
            return self._infer_cuda_graph(feed_dict)
        return self._infer_bound(feed_dict)

    def _infer_bound(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """I/O binding: inputs copied to the device once, outputs allocated there by ORT, copied back once."""
        binding = self._device_binding(feed_dict)
        self.session.run_with_iobinding(binding)
        return OrderedDict(zip(self.output_names(), binding.copy_outputs_to_cpu(), strict=True))

    def _infer_cuda_graph(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        captured = self._captured(feed_dict)
        captured.load(feed_dict)
        captured.run(self.session)
        return OrderedDict((n, v.numpy()) for n, v in captured.outputs.items())

    def device_call(self, feed_dict: dict[str, np.ndarray]):
        """A zero-argument call that runs one batch of `feed_dict` with its inputs already in device memory (for
        timing on CUDA): the session run alone, outputs left on the device. Under CUDA graphs it replays this
        batch size's own graph (its own gpu_graph_id and buffers), so calls made for several sizes before any is
        timed each run their own size."""
        if not self.uses_cuda:
            raise DcncError(f"{self.name}: runs on the CPU provider, so there is nothing to keep on a device")
        if self.cuda_graph:
            captured = self._captured(feed_dict)
            captured.load(feed_dict)
            return lambda: captured.run(self.session)
        binding = self._device_binding(feed_dict)
        return lambda: self.session.run_with_iobinding(binding)

    def _device_binding(self, feed_dict: dict[str, np.ndarray]):
        """An I/O binding with the inputs copied into device memory and the outputs allocated there by ORT."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for input_name, array in feed_dict.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)
            binding.bind_ortvalue_input(input_name, value)
        for output_name in self.output_names():
            binding.bind_output(output_name, "cuda", self.device_id)
        return binding

    def _captured(self, feed_dict: dict[str, np.ndarray]) -> _CapturedBatch:
        """This batch size's CUDA graph: its id and the device buffers it was captured on (made on first use)."""
        batch = batch_of(feed_dict)
        if batch not in self._graphs:
            graph_id = len(self._graphs) + 1  # 0 is ORT's default id, -1 turns capture off for a run
            self._graphs[batch] = _CapturedBatch(self, graph_id, feed_dict)
        return self._graphs[batch]


class _CapturedBatch:
    """The fixed device buffers of one batch size's CUDA graph in an ORT session, and its gpu_graph_id: ORT
    captures a graph per id on that id's first runs and replays it after, reading and writing the addresses it
    was captured with, so inputs are updated in place and outputs preallocated."""

    def __init__(self, runner: OrtRunner, graph_id: int, feed_dict: dict[str, np.ndarray]):
        import onnxruntime as ort

        batch, device_id = batch_of(feed_dict), runner.device_id
        self.inputs = {
            n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", device_id) for n, a in feed_dict.items()
        }
        self.outputs = {}
        for node in runner.session.get_outputs():
            shape = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(node.shape)]
            if not all(isinstance(d, int) for d in shape):
                raise DcncError(
                    f"{runner.name}: output {node.name} has dynamic dims {node.shape} besides the batch,"
                    " so it cannot run under a CUDA graph; rebuild without --cuda-graph"
                )
            self.outputs[node.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                shape, ORT_TYPES[node.type], "cuda", device_id
            )
        self.binding = runner.session.io_binding()
        for n, v in self.inputs.items():
            self.binding.bind_ortvalue_input(n, v)
        for n, v in self.outputs.items():
            self.binding.bind_ortvalue_output(n, v)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def load(self, feed_dict: dict[str, np.ndarray]) -> None:
        for n, a in feed_dict.items():
            self.inputs[n].update_inplace(np.ascontiguousarray(a))

    def run(self, session) -> None:
        session.run_with_iobinding(self.binding, self.run_options)


def ort_runner(path, backend: str = "ort", options=None, name: str | None = None, **kwargs) -> OrtRunner:
    """An OrtRunner over the ONNX file at `path` (the session is created on activate)."""
    return OrtRunner(SessionFromOnnx(path, backend, options, **kwargs), name=name)
