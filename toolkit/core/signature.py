"""Tensor signatures of tower inputs: name, dtype and shape with a symbolic batch dimension `B`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.core.errors import DcncError

DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """One input. `shape` holds ints and names of dynamic dims ("B" is the batch); `high` bounds integer ids."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    high: int | None = None

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """Parse `NAME:DTYPE:SHAPE[:HIGH]`, e.g. `x:float32:B,512` or `ids:int64:B:1000` (ids in [0, 1000))."""
        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[0]:
            raise DcncError(f"--input {text!r}: expected NAME:DTYPE:SHAPE (e.g. x:float32:B,512)")
        name, dtype, shape_text = parts[:3]
        if dtype not in DTYPES:
            raise DcncError(f"--input {text!r}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        shape: list[int | str] = []
        for dim in shape_text.split(","):
            dim = dim.strip()
            if dim.isdigit() and int(dim) > 0:
                shape.append(int(dim))
            elif dim.isidentifier():
                shape.append(dim)
            else:
                raise DcncError(f"--input {text!r}: dimension {dim!r} is neither a positive int nor a name like B")
        high = None
        if len(parts) == 4:
            if not parts[3].isdigit() or int(parts[3]) < 1 or not dtype.startswith("int"):
                raise DcncError(f"--input {text!r}: the 4th field bounds integer ids and must be a positive int")
            high = int(parts[3])
        return cls(name, dtype, tuple(shape), high)

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape with every named dimension set to `batch` (the batch is the only dynamic dim dcnc varies)."""
        return tuple(batch if isinstance(d, str) else d for d in self.shape)

    def random(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """Random valid input: ids uniform in [0, high), floats standard normal."""
        shape = self.concrete_shape(batch)
        if self.dtype == "bool":
            return rng.random(shape) < 0.5
        if self.dtype.startswith("int"):
            return rng.integers(0, self.high or 2, size=shape).astype(self.dtype)
        return rng.standard_normal(shape).astype(self.dtype)

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype}:{','.join(map(str, self.shape))}"


def random_inputs(specs: list[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: s.random(batch, rng) for s in specs}
