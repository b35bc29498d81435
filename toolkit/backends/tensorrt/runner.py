"""The TensorRT runner: dynamic batch bindings in torch CUDA tensors, its own CUDA stream, optional CUDA graphs.

Device memory is torch CUDA tensors (torch is always installed; no pycuda / cuda-python dependency): each
input is copied into one, each output allocated as one at the shape the execution context reports.

An execution context holds the input shapes and tensor addresses last set on it, and a CUDA graph captured on
it replays with that context's state. So `infer` rebinds one context at every call, while what must stay bound
(a batch size timed with its inputs already on the device, a captured graph) gets an execution context of its
own per batch size. The contexts run one after another on the runner's one stream, which TensorRT allows for
contexts sharing an optimization profile (only contexts in concurrent use need separate profiles).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from toolkit.backends.base import InputMeta, Runner, batch_of
from toolkit.core.errors import DcncError


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class _BoundBatch:
    """An execution context of its own with device buffers bound for one batch size, and its CUDA graph when
    the runner captures them (enqueued once uncaptured first: TensorRT's deferred work must not be captured)."""

    def __init__(self, runner: TrtRunner, feed_dict: dict[str, np.ndarray]):
        self.runner = runner
        self.context = runner.engine.create_execution_context()
        self.inputs, self.outputs = runner._bind(self.context, feed_dict)
        self.graph = None
        if runner.cuda_graph:
            runner._enqueue(self.context)
            runner.stream.synchronize()
            self.graph = runner.capture(lambda: runner._enqueue(self.context))

    def load(self, feed_dict: dict[str, np.ndarray]) -> None:
        """Copy a new batch of the same size into the bound input buffers."""
        import torch

        with torch.cuda.stream(self.runner.stream):
            for n in self.runner.input_names:
                self.inputs[n].copy_(torch.from_numpy(np.ascontiguousarray(feed_dict[n])))

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.runner._enqueue(self.context)


class TrtRunner(Runner):
    """Runs a TensorRT engine.

    Args:
        engine: a trt.ICudaEngine, or a loader (e.g. EngineFromPath) called on activate.
        name: the runner's name (default "tensorrt").
        batch_range: (min, max) batch of the engine's profile; infer refuses others (default: any).
        device_id: the CUDA device (default 0).
        cuda_graph: capture one CUDA graph per batch size on first use, each on its own execution context, and
            replay it after (default False).
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

    def open_device(self):
        """(torch device, stream) the runner keeps its buffers on and enqueues on: the CUDA device `device_id`
        and a stream of the runner's own (TensorRT warns that the default stream adds synchronisations)."""
        import torch

        if not torch.cuda.is_available():
            raise DcncError(f"{self.name}: torch sees no CUDA device, so the TensorRT engine cannot run here")
        device = torch.device("cuda", self.device_id)
        torch.cuda.set_device(device)
        return device, torch.cuda.Stream(device)

    def capture(self, enqueue):
        """A CUDA graph of what `enqueue()` puts on the runner's stream; `.replay()` runs it again."""
        import torch

        graph = torch.cuda.CUDAGraph()
        try:
            # thread-local capture, as trtexec captures: other threads' CUDA calls do not break it
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                enqueue()
        except (RuntimeError, DcncError) as err:
            raise DcncError(
                f"{self.name}: the engine cannot be captured in a CUDA graph ({str(err).splitlines()[0]});"
                " rebuild without --cuda-graph"
            ) from None
        return graph

    def activate_impl(self) -> None:
        import tensorrt as trt

        self.device, self.stream = self.open_device()
        self.engine = self._engine() if callable(self._engine) else self._engine
        self.context = self.engine.create_execution_context()  # infer's own, rebound at every call
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._bound: dict[int, _BoundBatch] = {}

    def deactivate_impl(self) -> None:
        self.stream.synchronize()
        del self._bound, self.context, self.engine, self.stream

    def input_metadata_impl(self) -> list[tuple[str, InputMeta]]:
        metadata = []
        for n in self.input_names:
            shape = tuple("B" if d < 0 else int(d) for d in self.engine.get_tensor_shape(n))
            metadata.append((n, InputMeta(self.dtypes[n], shape)))
        return metadata

    def _bind(self, context, feed_dict: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """Copy the inputs to the device on our stream, set their shapes and addresses on `context`, and allocate
        the outputs at the shapes it then reports."""
        import torch

        inputs, outputs = {}, {}
        with torch.cuda.stream(self.stream):
            for n in self.input_names:
                inputs[n] = torch.from_numpy(np.ascontiguousarray(feed_dict[n])).to(self.device)
                if not context.set_input_shape(n, tuple(inputs[n].shape)):
                    raise DcncError(f"{self.name}: TensorRT refused shape {tuple(inputs[n].shape)} for input {n}")
                context.set_tensor_address(n, inputs[n].data_ptr())
            for n in self.output_names:
                shape = tuple(context.get_tensor_shape(n))
                outputs[n] = torch.empty(shape, dtype=_torch_dtype(self.dtypes[n]), device=self.device)
                context.set_tensor_address(n, outputs[n].data_ptr())
        return inputs, outputs

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise DcncError(f"{self.name}: TensorRT failed to enqueue the engine (see TensorRT's log)")

    def _bound_batch(self, feed_dict: dict[str, np.ndarray]) -> _BoundBatch:
        batch = batch_of(feed_dict)
        if batch not in self._bound:
            self._bound[batch] = _BoundBatch(self, feed_dict)
        return self._bound[batch]

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        if self.cuda_graph:
            bound = self._bound_batch(feed_dict)
            bound.load(feed_dict)
            bound.run()
            outputs = bound.outputs
        else:
            _, outputs = self._bind(self.context, feed_dict)
            self._enqueue(self.context)
        self.stream.synchronize()
        return OrderedDict((n, outputs[n].cpu().numpy()) for n in self.output_names)

    def device_call(self, feed_dict: dict[str, np.ndarray]):
        """A zero-argument call that runs one batch of `feed_dict` with its inputs already on the device (for
        timing): the enqueue (or graph replay) on this batch size's own execution context, and the wait for it.
        Calls made for several sizes before any is timed each run their own size."""
        self._require_active("device_call")
        bound = self._bound_batch(feed_dict)
        bound.load(feed_dict)

        def call():
            bound.run()
            self.stream.synchronize()

        return call
