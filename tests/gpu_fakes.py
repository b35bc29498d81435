"""Small fakes of the onnxruntime-gpu and TensorRT objects dcnc drives on a GPU, which record the calls made to
them, so the CUDA paths are tested on CPU machines: what the provider options say, which gpu_graph_id a run
passes, which shapes an execution context holds when it is enqueued or its captured graph replayed."""

from __future__ import annotations

import json
import sys
import types
from collections import OrderedDict

import numpy as np
import onnxruntime as real_ort
import torch

from toolkit.backends.tensorrt.runner import TrtRunner

CUDA = "CUDAExecutionProvider"
CAPTURE_REFUSAL = (
    "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as requested by the user as"
    " all compute graph nodes have not been partitioned to the CUDAExecutionProvider"
)


# --- onnxruntime-gpu ------------------------------------------------------------------------------------------
class FakeOrtValue:
    """An OrtValue "on the device": a numpy array, updated in place like the real one."""

    def __init__(self, array: np.ndarray):
        self.array = array

    @staticmethod
    def ortvalue_from_numpy(array, device="cpu", device_id=0):
        return FakeOrtValue(np.array(array))

    @staticmethod
    def ortvalue_from_shape_and_type(shape, dtype, device="cpu", device_id=0):
        return FakeOrtValue(np.zeros(shape, dtype=dtype))

    def update_inplace(self, array) -> None:
        self.array[...] = array

    def numpy(self) -> np.ndarray:
        return self.array


class FakeRunOptions:
    def __init__(self):
        self.entries: dict[str, str] = {}

    def add_run_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


class FakeBinding:
    def __init__(self):
        self.inputs: dict[str, FakeOrtValue] = {}
        self.outputs: dict[str, FakeOrtValue | None] = {}

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = value

    def bind_output(self, name, device="cpu", device_id=0):
        self.outputs[name] = None  # allocated by the session at run time

    def copy_outputs_to_cpu(self):
        return [v.array for v in self.outputs.values()]


class FakeNode:
    def __init__(self, name: str, shape: list, type_: str = "tensor(float)"):
        self.name, self.shape, self.type = name, shape, type_


class FakeCudaSession:
    """A session whose first provider is CUDA (unless `fallback`): one float input `x` [batch, 4], one output
    `y` [batch, 2] = the batch's row sums in both columns. Each run is recorded with its input batch, the
    gpu_graph_id it passed and the output buffers it wrote."""

    def __init__(self, provider_options: dict | None = None, fallback: bool = False):
        self.provider_options = provider_options or {"device_id": "0", "enable_cuda_graph": "0", "use_tf32": "0"}
        self.fallback = fallback
        self.runs: list[dict] = []

    def get_providers(self):
        return ["CPUExecutionProvider"] if self.fallback else [CUDA, "CPUExecutionProvider"]

    def get_provider_options(self):
        return {CUDA: dict(self.provider_options), "CPUExecutionProvider": {}}

    def get_inputs(self):
        return [FakeNode("x", ["batch", 4])]

    def get_outputs(self):
        return [FakeNode("y", ["batch", 2])]

    def io_binding(self):
        return FakeBinding()

    def run(self, names, feed):
        return [np.repeat(feed["x"].sum(axis=1, keepdims=True), 2, axis=1)]

    def run_with_iobinding(self, binding: FakeBinding, run_options: FakeRunOptions | None = None):
        x = binding.inputs["x"].array
        y = np.repeat(x.sum(axis=1, keepdims=True), 2, axis=1).astype(np.float32)
        if binding.outputs["y"] is None:
            binding.outputs["y"] = FakeOrtValue(y)
        else:
            binding.outputs["y"].array[...] = y
        graph_id = run_options.entries.get("gpu_graph_id") if run_options else None
        self.runs.append({"batch": len(x), "gpu_graph_id": graph_id, "output": binding.outputs["y"]})


def fake_onnxruntime(monkeypatch, refuse_cuda_graph: bool = False):
    """Install a fake `onnxruntime` (onnxruntime-gpu with a CUDA device): InferenceSession records what it was
    given in `module.sessions`, and refuses CUDA graphs as ORT does when `refuse_cuda_graph`."""
    module = types.ModuleType("onnxruntime")
    module.__version__ = real_ort.__version__
    module.SessionOptions = real_ort.SessionOptions
    module.GraphOptimizationLevel = real_ort.GraphOptimizationLevel
    module.ExecutionMode = real_ort.ExecutionMode
    module.OrtValue = FakeOrtValue
    module.RunOptions = FakeRunOptions
    module.sessions = []
    module.get_available_providers = lambda: [CUDA, "CPUExecutionProvider"]
    module.set_default_logger_severity = real_ort.set_default_logger_severity

    def inference_session(source, sess_options=None, providers=None):
        cuda = dict(providers[0][1]) if isinstance(providers[0], tuple) else None
        module.sessions.append({"source": source, "providers": providers})
        if cuda is None:
            return real_ort.InferenceSession(source, sess_options=sess_options, providers=providers)
        if refuse_cuda_graph and cuda.get("enable_cuda_graph") == "1":
            raise RuntimeError(CAPTURE_REFUSAL)
        return FakeCudaSession(cuda)

    module.InferenceSession = inference_session
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    return module


# --- TensorRT -------------------------------------------------------------------------------------------------
class FakeContext:
    """An execution context: keeps the input shapes and addresses set on it, and records each enqueue with the
    shapes it held then."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls: list[tuple[str, tuple]] = []

    def set_input_shape(self, name, shape) -> bool:
        self.shapes[name] = tuple(shape)
        self.shape_calls.append((name, tuple(shape)))
        return True

    def get_tensor_shape(self, name):
        batch = self.shapes["x"][0]
        return (batch, 2)

    def set_tensor_address(self, name, address) -> None:
        self.addresses[name] = address

    def execute_async_v3(self, stream) -> bool:
        self.engine.executions.append({"context": self, "shapes": dict(self.shapes), "addresses": dict(self.addresses)})
        return True


class FakeEngine:
    """An engine with input `x` [-1, 4] and output `y` [-1, 2] (float32), whose layers the inspector reports as
    `layers`."""

    num_io_tensors = 2
    num_aux_streams = 1

    def __init__(self, layers: list | None = None):
        self.contexts: list[FakeContext] = []
        self.executions: list[dict] = []
        self.layers = layers or []

    def get_tensor_name(self, index: int) -> str:
        return ("x", "y")[index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "x" else "OUTPUT"

    def get_tensor_dtype(self, name: str):
        return np.float32

    def get_tensor_shape(self, name: str):
        return (-1, 4) if name == "x" else (-1, 2)

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]

    def create_engine_inspector(self):
        return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": self.layers}))


class FakeStream:
    cuda_stream = 0

    def synchronize(self) -> None:
        pass


class FakeGraph:
    """A "captured" CUDA graph: replaying it runs what was captured again, on the context it was captured on."""

    def __init__(self, enqueue):
        self.replay = enqueue


class HostTrtRunner(TrtRunner):
    """TrtRunner with its buffers in host memory and a fake stream and graphs: the calls it makes on the engine's
    execution contexts are TrtRunner's own."""

    def open_device(self):
        return torch.device("cpu"), FakeStream()

    def capture(self, enqueue):
        return FakeGraph(enqueue)


def fake_tensorrt(monkeypatch):
    """Install a fake `tensorrt` module with what the runner, the inspector and the builder config read from it."""
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.13.0"
    module.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    module.nptype = lambda dtype: dtype
    module.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    module.HardwareCompatibilityLevel = types.SimpleNamespace(NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2)
    module.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def feed(batch: int) -> OrderedDict:
    return OrderedDict(x=np.arange(batch * 4, dtype=np.float32).reshape(batch, 4))
