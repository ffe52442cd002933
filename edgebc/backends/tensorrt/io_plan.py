"""How an engine's named tensors are fed, worked out before CUDA is touched: each input's shape per
call, one device buffer per tensor sized for the profile's largest batch, a batch split into the
runs the profile allows. Pure numpy, so the planning is tested where no GPU is.

TensorRT 10 needs an address for every input and output tensor before `execute_async_v3`, even
an output nobody reads (a single model's features), so every engine output gets a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebc.errors import EdgebcError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One I/O tensor as the engine declares it: `dims` with -1 where dynamic (the batch), and for
    an input the largest batch its optimisation profile (profile 0) accepts."""

    name: str
    is_input: bool
    dims: Shape
    dtype: np.dtype
    profile_max_batch: int | None = None


@dataclass(frozen=True)
class IOPlan:
    """Inputs and outputs by name (shapes without the batch), the engine's largest batch, and the
    outputs a caller gets back (every output has a buffer; only these are copied to the host)."""

    inputs: dict[str, Shape]
    outputs: dict[str, Shape]
    max_batch: int
    returned: tuple[str, ...]

    def buffer_bytes(self) -> dict[str, int]:
        """Device bytes per tensor: float32 at the largest batch."""
        tensors = {**self.inputs, **self.outputs}
        return {n: self.max_batch * int(np.prod(s, dtype=np.int64)) * 4 for n, s in tensors.items()}

    def input_shapes(self, rows: int) -> dict[str, Shape]:
        """What `set_input_shape` is told for a run of `rows`."""
        return {name: (rows, *shape) for name, shape in self.inputs.items()}

    def output_shapes(self, rows: int) -> dict[str, Shape]:
        return {name: (rows, *self.outputs[name]) for name in self.returned}

    def runs(self, rows: int) -> list[slice]:
        """The batch in pieces the profile accepts, in order."""
        if rows < 1:
            raise ValueError(f"a batch has at least one row, got {rows}")
        return [slice(k, min(k + self.max_batch, rows)) for k in range(0, rows, self.max_batch)]


def plan_io(
    tensors: Sequence[TensorSpec],
    declared: Sequence[tuple[str, Shape]],
    returned: Sequence[str],
    source: str,
) -> IOPlan:
    """The plan for an engine whose tensors are `tensors`, checked against the inputs its card
    (or fusion layout) declares and the outputs the caller wants; a mismatch names what differs."""
    inputs = {t.name: t for t in tensors if t.is_input}
    outputs = {t.name: t for t in tensors if not t.is_input}
    wanted = dict(declared)
    if set(inputs) != set(wanted):
        raise EdgebcError(
            f"{source}: the engine's inputs {sorted(inputs)} are not the declared {sorted(wanted)}; "
            "rebuild it from this model's ONNX"
        )
    missing = [n for n in returned if n not in outputs]
    if missing:
        raise EdgebcError(
            f"{source}: the engine has no output {missing[0]} (it has {sorted(outputs)})"
        )
    for spec in tensors:
        if np.dtype(spec.dtype) != np.float32:
            raise EdgebcError(
                f"{source}: tensor {spec.name} is {np.dtype(spec.dtype)}; edgebc feeds and reads "
                "float32 (engines built by edgebc keep float32 I/O)"
            )
        if not spec.dims or spec.dims[0] != -1 or any(d < 1 for d in spec.dims[1:]):
            raise EdgebcError(
                f"{source}: tensor {spec.name} has shape {spec.dims}; edgebc expects a dynamic "
                "batch (-1) and fixed other axes, as `edgebc export --tensorrt` builds them"
            )
    for name, spec in inputs.items():
        if spec.dims[1:] != tuple(wanted[name]):
            raise EdgebcError(
                f"{source}: input {name} is (N, {', '.join(map(str, spec.dims[1:]))}) in the "
                f"engine but (N, {', '.join(map(str, wanted[name]))}) in its card"
            )
    limits = [t.profile_max_batch for t in inputs.values()]
    if any(limit is None or limit < 1 for limit in limits):
        raise EdgebcError(f"{source}: an input has no optimisation profile with a batch range")
    return IOPlan(
        inputs={name: tuple(wanted[name]) for name, _ in declared},
        outputs={n: tuple(t.dims[1:]) for n, t in outputs.items()},
        max_batch=min(int(limit) for limit in limits if limit is not None),
        returned=tuple(returned),
    )
