"""ONNX files in and out, the one way dcnc does it: load (with its one-line errors), save (atomic, external data
only past protobuf's 2 GB), the tensor signatures of a graph's inputs and outputs, and dcnc's metadata props."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from toolkit.core.errors import DcncError, first_line
from toolkit.core.fileio import atomic_path, atomic_write_bytes, sha256_weights
from toolkit.core.signature import TensorSpec

EXTERNAL_DATA_THRESHOLD = 2**31 - 1  # protobuf cannot serialise one message above 2 GB
UNNAMED_DIM = "?"  # a dynamic dim with neither a value nor a name


def load_onnx(path: str | Path, check: bool = False, external_data: bool = True) -> onnx.ModelProto:
    """The model at `path`, or DcncError in one line when it is missing, unreadable or (with `check`) invalid.

    external_data: also read the tensors its initializers keep in files beside it (False: the graph alone,
    for looking at structure)."""
    path = Path(path)
    if not path.is_file():
        raise DcncError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=external_data)
    except Exception as err:  # onnx raises DecodeError, ValueError, OSError, ... for files that are not models
        raise DcncError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    if model.ir_version < 1 or not model.HasField("graph") or not model.opset_import:
        raise DcncError(f"{path}: not an ONNX model (no IR version, graph or opset)")
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as err:  # ValidationError, and C++ errors surfacing as others
            raise DcncError(f"{path}: not a valid ONNX model ({first_line(err)})") from None
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """Write `model` atomically as one self-contained, deterministic file; above 2 GB its tensors go to
    `<name>.data` beside it (protobuf's limit), which is removed again if the write fails."""
    path = Path(path)
    if model.ByteSize() <= EXTERNAL_DATA_THRESHOLD:
        atomic_write_bytes(path, model.SerializeToString(deterministic=True))
        return
    data = path.parent / f"{path.name}.data"
    try:
        with atomic_path(path) as tmp:
            onnx.save_model(
                model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
            )
    except BaseException:
        data.unlink(missing_ok=True)
        raise


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The files (as the graph names them, relative to its own folder) that hold its external initializers."""
    from onnx.external_data_helper import uses_external_data

    return sorted({
        entry.value for tensor in model.graph.initializer if uses_external_data(tensor)
        for entry in tensor.external_data if entry.key == "location"
    })  # fmt: skip


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or UNNAMED_DIM) for d in tensor.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller feeds (initializers listed as inputs left out), dynamic dims kept as their names, and
    integer ids bounded by the embedding table they index (id_bounds), so data is range-checked before it runs."""
    initializers = {init.name for init in model.graph.initializer}
    bounds = id_bounds(model)
    return [
        dataclasses.replace(spec, high=bounds.get(spec.name)) if spec.dtype.startswith("int") else spec
        for spec in (_spec(value) for value in model.graph.input if value.name not in initializers)
    ]


def id_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Per input read as ids by a Gather on an initializer table (an embedding): the table's rows, which every id
    must stay below (ONNX Runtime fails mid-run on one that does not)."""
    tables = {init.name: init.dims[0] for init in model.graph.initializer if init.dims}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and axis == 0 and len(node.input) == 2 and node.input[0] in tables:
            ids = node.input[1]
            bounds[ids] = min(bounds.get(ids, tables[node.input[0]]), tables[node.input[0]])
    return bounds


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(value) for value in model.graph.output]


def tensor_entries(specs: list[TensorSpec]) -> list[dict]:
    """{name, dtype, shape} records, as a bundle manifest lists a tower's inputs and outputs."""
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]


def weight_digests(model: onnx.ModelProto) -> dict[str, str]:
    """sha256_weights of each float32 initializer with a shape (parameters keep their torch names in an export)."""
    return {init.name: sha256_weights(numpy_helper.to_array(init)) for init in model.graph.initializer
            if init.data_type == onnx.TensorProto.FLOAT and init.dims}  # fmt: skip


def set_metadata(model: onnx.ModelProto, key: str, value: Any) -> onnx.ModelProto:
    """Store `value` (a string as is, anything else as sorted JSON) under `key` in the model's metadata props,
    replacing an earlier value of that key; returns the model."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=key, value=text)
    return model


def get_metadata(model: onnx.ModelProto, key: str) -> Any:
    """The JSON stored under `key` by set_metadata, or None when the model has no such prop."""
    text = next((p.value for p in model.metadata_props if p.key == key), None)
    return None if text is None else json.loads(text)
