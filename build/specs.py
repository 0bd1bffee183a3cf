"""One spec object per compiled component: names, dtypes, dynamic axes, shape profiles, tolerances.

ONNX export (input/output names, dynamic axes), sample inputs for tracing and parity checks, and
the Triton config's inputs and outputs are all derived from a `ComponentSpec`; nothing repeats a
tensor name or a shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from build.triton_config import Tensor

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
          "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a component; a string in `shape` names a dynamic axis (its range is in the profile)."""

    name: str
    dtype: str  # Triton wire dtype name: FP32, INT64, ...
    shape: tuple[int | str, ...]
    optional: bool = False  # inputs only: may be left out of a request (the model fills a default)
    value_range: tuple[float, float] = (-1.0, 1.0)  # where sample values are drawn from (ints: [low, high))

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY[self.dtype])

    def concrete_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Resolve named axes; "axis/N" is that axis divided by N (feature maps after downsampling)."""
        def size(dim: int | str) -> int:
            if isinstance(dim, int):
                return dim
            axis, _, divisor = dim.partition("/")
            return sizes[axis] // int(divisor) if divisor else sizes[axis]

        return tuple(size(d) for d in self.shape)

    def triton_tensor(self, batched: bool = True) -> Tensor:
        """As a Triton config tensor; for a batching model the leading batch axis is implicit.

        A per-sample scalar (shape ("batch",)) is sent as dims [1] and reshaped to () for the model.
        """
        shape = self.shape[1:] if batched else self.shape
        dims = tuple(-1 if isinstance(d, str) else d for d in shape)
        if not dims:
            return Tensor(self.name, self.dtype, (1,), optional=self.optional, reshape=())
        return Tensor(self.name, self.dtype, dims, optional=self.optional)

    def sample(self, sizes: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
        shape = self.concrete_shape(sizes)
        low, high = self.value_range
        if np.issubdtype(self.numpy_dtype, np.integer):
            return rng.integers(int(low), int(high), size=shape).astype(self.numpy_dtype)
        return rng.uniform(low, high, size=shape).astype(self.numpy_dtype)


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact may be from PyTorch on the reference output, and why that much."""

    min_cosine: float  # cosine similarity of the flattened outputs
    max_abs: float | None = None  # largest absolute difference; None where only the direction is meaningful
    min_top1: float | None = None  # fraction of samples whose arg-max agrees (classifiers)
    why: str = ""


@dataclass(frozen=True)
class ComponentSpec:
    """A compiled component: its interface, the ranges of its dynamic axes, and its tolerances."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: Mapping[str, tuple[int, int, int]]  # dynamic axis -> (min, opt, max)
    tolerances: Mapping[str, Tolerance]  # precision -> tolerance on `reference_output`
    reference_output: str  # the output that parity is judged on
    opset: int = 17
    extra: Mapping[str, object] = field(default_factory=dict)
    # Makes sampled inputs agree where one indexes another (the text encoder's ids that point into its
    # token_vectors), in place; None: every input is drawn on its own
    link_samples: Callable[[dict[str, np.ndarray], np.random.Generator], None] | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def max_batch_size(self) -> int:
        return self.profile["batch"][2]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For torch.onnx.export(dynamic_axes=...)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def sizes(self, which: str = "opt", **override: int) -> dict[str, int]:
        index = {"min": 0, "opt": 1, "max": 2}[which]
        return {axis: r[index] for axis, r in self.profile.items()} | override

    def sample_inputs(self, seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        concrete = self.sizes(**sizes)
        samples = {t.name: t.sample(concrete, rng) for t in self.inputs}
        if self.link_samples is not None:
            self.link_samples(samples, rng)
        return samples

    def tolerance(self, precision: str) -> Tolerance:
        try:
            return self.tolerances[precision]
        except KeyError:
            raise KeyError(f"{self.name}: no tolerance for precision {precision!r}; "
                           f"known: {sorted(self.tolerances)}") from None

    def triton_inputs(self, batched: bool = True) -> tuple[Tensor, ...]:
        return tuple(t.triton_tensor(batched) for t in self.inputs)

    def triton_outputs(self, batched: bool = True) -> tuple[Tensor, ...]:
        return tuple(t.triton_tensor(batched) for t in self.outputs)
