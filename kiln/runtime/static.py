"""Static shapes: OpenVINO models compiled at fixed input shapes, for devices that need them (NPU).

A static build (`kiln build sd|vit --static-size`) keeps the dynamic IR on disk and writes a plan into the served
config: every input's shape at each built image size, with a batch of one. The session reshapes a copy of the IR to
each shape set and compiles it once (OpenVINO's model cache keeps the compiled blobs); a call runs its rows one batch
of the plan at a time on the shape set its per-row shapes match, so the step batcher and Triton's batching still work.
An input without a batch axis (the text encoder's textual-inversion vectors) is padded with zero rows to its static
length: rows no id points at change nothing. A call at shapes the plan lacks is an InputError naming the built ones
(the service refuses such requests before they run; this is the last guard).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.errors import ConfigError, InputError


@dataclass(frozen=True)
class StaticPlan:
    """The shapes a static model is compiled at."""

    batch: int  # rows per compiled call
    batched: tuple[str, ...]  # inputs whose first axis is the batch (split into calls of `batch` rows)
    padded: tuple[str, ...]  # inputs padded with zero rows along their first axis to the static length
    shapes: tuple[Mapping[str, tuple[int, ...]], ...]  # {input: shape} per compiled model, batch axis = `batch`
    sizes: tuple[str, ...] = ()  # the image sizes the shape sets are for ("512x512"), for messages

    def to_json(self) -> str:
        return json.dumps({"batch": self.batch, "batched": list(self.batched), "padded": list(self.padded),
                           "shapes": [{k: list(v) for k, v in s.items()} for s in self.shapes],
                           "sizes": list(self.sizes)})

    @classmethod
    def from_json(cls, text: str) -> StaticPlan:
        try:
            data = json.loads(text)
            return cls(int(data["batch"]), tuple(data["batched"]), tuple(data["padded"]),
                       tuple({k: tuple(int(d) for d in v) for k, v in s.items()} for s in data["shapes"]),
                       tuple(data.get("sizes", ())))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"static_shapes is not a static plan ({exc}); rebuild with --static-size") from None

    def describe(self) -> str:
        if self.sizes:
            return ", ".join(self.sizes)
        return "; ".join(", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in s.items()) for s in self.shapes)

    def matching(self, feed: Mapping[str, np.ndarray]) -> int:
        """The shape set `feed` runs on (by its per-row shapes), or an InputError naming the built ones."""
        for index, shapes in enumerate(self.shapes):
            if all(self._fits(name, np.shape(value), shapes[name]) for name, value in feed.items() if name in shapes):
                return index
        got = ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in feed.items())
        raise InputError(f"this static build runs at the sizes it was built for ({self.describe()}); got {got}")

    def _fits(self, name: str, shape: tuple[int, ...], static: tuple[int, ...]) -> bool:
        if name in self.batched:
            return tuple(shape[1:]) == tuple(static[1:])
        if name in self.padded:
            return len(shape) == len(static) and shape[0] <= static[0] and tuple(shape[1:]) == tuple(static[1:])
        return tuple(shape) == tuple(static)


class StaticModels:
    """One compiled model per shape set of a plan, and the batch-splitting run over them (not thread-safe: the
    session holds the lock)."""

    def __init__(self, core, model, device: str, config: dict, plan: StaticPlan) -> None:
        self.plan = plan
        names = {name for port in model.inputs for name in port.get_names()}
        self.compiled, self.requests, self.ports = [], [], []
        for shapes in plan.shapes:
            fixed = model.clone()
            fixed.reshape({name: list(shape) for name, shape in shapes.items() if name in names})
            compiled = core.compile_model(fixed, device, config)
            self.compiled.append(compiled)
            self.requests.append(compiled.create_infer_request())
            self.ports.append({name: port for port in compiled.outputs for name in port.get_names()})

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        index = self.plan.matching(feed)
        shapes, request, ports = self.plan.shapes[index], self.requests[index], self.ports[index]
        batched = [name for name in self.plan.batched if name in feed]
        rows = int(np.shape(feed[batched[0]])[0]) if batched else self.plan.batch
        fixed = {name: _padded(feed[name], shapes[name][0]) for name in self.plan.padded if name in feed}
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, rows, self.plan.batch):
            take = min(self.plan.batch, rows - start)
            chunk = {name: _padded(np.asarray(feed[name])[start:start + take], self.plan.batch) for name in batched}
            request.infer(chunk | fixed | {k: v for k, v in feed.items() if k not in chunk and k not in fixed})
            for name in names:  # a short last chunk was padded: its extra rows are dropped
                parts[name].append(np.array(request.get_tensor(ports[name]).data[:take], copy=True))
        return {name: np.concatenate(values) for name, values in parts.items()}


def _padded(value: np.ndarray, length: int) -> np.ndarray:
    """`value` with zero rows appended along its first axis up to `length`."""
    value = np.asarray(value)
    if value.shape[0] >= length:
        return value
    return np.concatenate([value, np.zeros((length - value.shape[0], *value.shape[1:]), value.dtype)])
