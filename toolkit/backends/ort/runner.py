"""The ONNX Runtime runner: CPU sessions run plainly; CUDA sessions use I/O binding and, if enabled, CUDA graphs."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from toolkit.backends.base import InputMeta, Runner
from toolkit.backends.ort.loader import CUDA_PROVIDER, SessionFromOnnx
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
        self._graphs: dict[int, tuple] = {}  # batch -> (graph id, inputs, outputs, binding)

    def activate_impl(self) -> None:
        self.session = self._session() if callable(self._session) else self._session
        self.uses_cuda = self.session.get_providers()[0] == CUDA_PROVIDER
        if self.uses_cuda:
            cuda_options = self.session.get_provider_options().get(CUDA_PROVIDER, {})
            self.cuda_graph = cuda_options.get("enable_cuda_graph") == "1"
            self.device_id = int(cuda_options.get("device_id", 0))

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
        import onnxruntime as ort

        binding = self.session.io_binding()
        for input_name, array in feed_dict.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)
            binding.bind_ortvalue_input(input_name, value)
        for output_name in self.output_names():
            binding.bind_output(output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return OrderedDict(zip(self.output_names(), binding.copy_outputs_to_cpu(), strict=True))

    def _infer_cuda_graph(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """One captured graph per batch size: its buffers stay at fixed device addresses, inputs are updated in place."""
        import onnxruntime as ort

        batch = int(next(iter(feed_dict.values())).shape[0])
        if batch not in self._graphs:
            graph_id = len(self._graphs) + 1  # ORT reserves 0; -1 disables capture
            inputs = {
                n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", self.device_id)
                for n, a in feed_dict.items()
            }
            outputs = {}
            for node in self.session.get_outputs():
                shape = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(node.shape)]
                if not all(isinstance(d, int) for d in shape):
                    raise DcncError(
                        f"{self.name}: output {node.name} has dynamic dims {node.shape} besides the batch,"
                        " so it cannot run under a CUDA graph; rebuild without --cuda-graph"
                    )
                outputs[node.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, ORT_TYPES[node.type], "cuda", self.device_id
                )
            binding = self.session.io_binding()
            for n, v in inputs.items():
                binding.bind_ortvalue_input(n, v)
            for n, v in outputs.items():
                binding.bind_ortvalue_output(n, v)
            self._graphs[batch] = (graph_id, inputs, outputs, binding)
        graph_id, inputs, outputs, binding = self._graphs[batch]
        for n, a in feed_dict.items():
            inputs[n].update_inplace(np.ascontiguousarray(a))
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, run_options)
        return OrderedDict((n, v.numpy()) for n, v in outputs.items())


def ort_runner(path, backend: str = "ort", options=None, name: str | None = None, **kwargs) -> OrtRunner:
    """An OrtRunner over the ONNX file at `path` (the session is created on activate)."""
    return OrtRunner(SessionFromOnnx(path, backend, options, **kwargs), name=name)
