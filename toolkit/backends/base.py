"""The runner interface every backend implements, shaped like polygraphy's BaseRunner so runners plug into its Comparator.

A runner is activated (session / engine / module made ready), fed a dict of numpy arrays by input name, and
returns a dict of numpy arrays by output name; `last_inference_time()` gives the seconds the last `infer` took.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from toolkit.core.errors import DcncError


@dataclass(frozen=True)
class InputMeta:
    """One input: numpy dtype and shape, with named (dynamic) dims kept as their names, e.g. ("B", 512)."""

    dtype: np.dtype
    shape: tuple[int | str, ...]

    def __iter__(self):  # unpacks as (dtype, shape), like polygraphy's MetadataTuple
        return iter((self.dtype, self.shape))


class Runner:
    """Base class: subclasses implement `activate_impl`, `input_metadata_impl`, `infer_impl`, `deactivate_impl`.

    Args:
        name: shown in reports and polygraphy's Comparator; defaults to the runner kind.
        batch_range: (min, max) batch sizes the artifact was built for; `infer` refuses batches outside it.
            None (the default) accepts any batch.
    """

    kind = "runner"

    def __init__(self, name: str | None = None, batch_range: tuple[int, int] | None = None):
        self.name = name or self.kind
        self.batch_range = batch_range
        self.inference_time: float | None = None
        self.is_active = False
        self._metadata: dict[str, InputMeta] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def activate(self) -> None:
        if self.is_active:
            return
        self.activate_impl()
        self.is_active = True
        self._metadata = OrderedDict(self.input_metadata_impl())

    def deactivate(self) -> None:
        if not self.is_active:
            return
        self.deactivate_impl()
        self.is_active = False
        self.inference_time = None
        self._metadata = None

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # --- queries ---------------------------------------------------------------------------------------------
    def get_input_metadata(self, use_numpy_dtypes: bool | None = None):
        """Inputs in forward order: name -> InputMeta(dtype, shape).

        `use_numpy_dtypes=False` is how polygraphy's Comparator asks; it then gets polygraphy's TensorMetadata
        (polygraphy DataTypes, the batch dim bounded by `batch_range`), so polygraphy must be installed.
        """
        self._require_active("get_input_metadata")
        if use_numpy_dtypes is False:
            return self._polygraphy_metadata()
        return OrderedDict(self._metadata)

    def last_inference_time(self) -> float | None:
        """Seconds the last `infer` took (host wall clock, including copies to and from the device)."""
        return self.inference_time

    # --- inference -------------------------------------------------------------------------------------------
    def infer(self, feed_dict: dict[str, np.ndarray], check_inputs: bool = True) -> OrderedDict[str, np.ndarray]:
        """Run one batch. Inputs are numpy arrays by input name; outputs come back as numpy arrays by output name."""
        self._require_active("infer")
        if check_inputs:
            self.check_feed(feed_dict)
        start = time.perf_counter()
        outputs = self.infer_impl(feed_dict)
        self.inference_time = time.perf_counter() - start
        return outputs

    def check_feed(self, feed_dict: dict[str, np.ndarray]) -> None:
        """Raise DcncError naming the first input whose name, dtype, rank, fixed dims or batch is wrong."""
        meta = self._metadata
        missing = [n for n in meta if n not in feed_dict]
        unexpected = [n for n in feed_dict if n not in meta]
        if missing or unexpected:
            raise DcncError(f"{self.name}: inputs do not match the model (missing {missing}, unexpected {unexpected})")
        for input_name, (dtype, shape) in meta.items():
            array = np.asarray(feed_dict[input_name])
            if array.dtype != dtype:
                raise DcncError(f"{self.name}: input {input_name} is {array.dtype}, the model expects {dtype}")
            if array.ndim != len(shape) or any(
                isinstance(d, int) and d != got for d, got in zip(shape, array.shape, strict=True)
            ):
                raise DcncError(
                    f"{self.name}: input {input_name} has shape {array.shape}, the model expects {tuple(shape)}"
                )
            if self.batch_range and array.ndim and not self.batch_range[0] <= array.shape[0] <= self.batch_range[1]:
                low, high = self.batch_range
                raise DcncError(
                    f"{self.name}: batch {array.shape[0]} is outside the batch profile {low}..{high} it was built for"
                )

    # --- for subclasses --------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def input_metadata_impl(self) -> list[tuple[str, InputMeta]]:
        raise NotImplementedError

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------------------------
    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise DcncError(f"{self.name}: call activate() (or use `with runner:`) before {what}()")

    def _polygraphy_metadata(self):
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        meta = TensorMetadata()
        for input_name, (dtype, shape) in self._metadata.items():
            dynamic = [None if isinstance(d, str) else d for d in shape]
            low, high = self.batch_range or (None, None)
            bounds = (None, None)
            if low is not None and shape and isinstance(shape[0], str) and all(isinstance(d, int) for d in shape[1:]):
                bounds = ([low, *shape[1:]], [high, *shape[1:]])
            meta.add(input_name, DataType.from_dtype(dtype), dynamic, min_shape=bounds[0], max_shape=bounds[1])
        return meta


def batch_of(feed_dict: dict[str, np.ndarray]) -> int:
    """The batch size of a feed: the leading dim of its first input."""
    first = next(iter(feed_dict.values()))
    return int(np.shape(first)[0])
