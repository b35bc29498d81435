"""The TensorRT runner: dynamic batch bindings in torch CUDA tensors, its own CUDA stream, optional CUDA graphs.

Device memory is torch CUDA tensors (torch is always installed; no pycuda / cuda-python dependency): each
input is copied into one, each output allocated as one at the shape the execution context reports.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from toolkit.backends.base import InputMeta, Runner
from toolkit.core.errors import DcncError


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class TrtRunner(Runner):
    """Runs a TensorRT engine.

    Args:
        engine: a trt.ICudaEngine, or a loader (e.g. EngineFromPath) called on activate.
        name: the runner's name (default "tensorrt").
        batch_range: (min, max) batch of the engine's profile; infer refuses others (default: any).
        device_id: the CUDA device (default 0).
        cuda_graph: capture one CUDA graph per batch size on first use and replay it after (default False).
    """

    kind = "tensorrt"

    def __init__(
        self, engine, name: str | None = None, batch_range: tuple[int, int] | None = None, device_id: int = 0,
        cuda_graph: bool = False,
    ):
        super().__init__(name, batch_range)
        self._engine = engine
        self.device_id = device_id
        self.cuda_graph = cuda_graph

    def activate_impl(self) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise DcncError(f"{self.name}: torch sees no CUDA device, so the TensorRT engine cannot run here")
        self.device = torch.device("cuda", self.device_id)
        torch.cuda.set_device(self.device)
        self.engine = self._engine() if callable(self._engine) else self._engine
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._graphs: dict[int, tuple] = {}  # batch -> (graph, input buffers, output buffers)

    def deactivate_impl(self) -> None:
        self.stream.synchronize()
        del self._graphs, self.context, self.engine, self.stream

    def input_metadata_impl(self) -> list[tuple[str, InputMeta]]:
        metadata = []
        for n in self.input_names:
            shape = tuple("B" if d < 0 else int(d) for d in self.engine.get_tensor_shape(n))
            metadata.append((n, InputMeta(self.dtypes[n], shape)))
        return metadata

    def _bind(self, feed_dict: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """Copy inputs to the device on our stream, set shapes and addresses, allocate outputs."""
        import torch

        inputs = {}
        with torch.cuda.stream(self.stream):
            for n in self.input_names:
                host = torch.from_numpy(np.ascontiguousarray(feed_dict[n]))
                inputs[n] = host.to(self.device, non_blocking=False)
                if not self.context.set_input_shape(n, tuple(inputs[n].shape)):
                    raise DcncError(f"{self.name}: TensorRT refused shape {tuple(inputs[n].shape)} for input {n}")
                self.context.set_tensor_address(n, inputs[n].data_ptr())
            outputs = {}
            for n in self.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                outputs[n] = torch.empty(shape, dtype=_torch_dtype(self.dtypes[n]), device=self.device)
                self.context.set_tensor_address(n, outputs[n].data_ptr())
        return inputs, outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DcncError(f"{self.name}: TensorRT failed to enqueue the engine (see TensorRT's log)")

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import torch

        if not self.cuda_graph:
            _, outputs = self._bind(feed_dict)
            self._execute()
        else:
            batch = int(np.shape(feed_dict[self.input_names[0]])[0])
            if batch not in self._graphs:
                inputs, outputs = self._bind(feed_dict)
                self._execute()  # the first enqueue does deferred allocations, which must not be captured
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
                self._graphs[batch] = (graph, inputs, outputs)
            graph, inputs, outputs = self._graphs[batch]
            with torch.cuda.stream(self.stream):
                for n in self.input_names:
                    inputs[n].copy_(torch.from_numpy(np.ascontiguousarray(feed_dict[n])))
                graph.replay()
        self.stream.synchronize()
        return OrderedDict((n, outputs[n].cpu().numpy()) for n in self.output_names)
