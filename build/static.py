"""Static-shape builds (`--static-size`): OpenVINO models compiled at fixed shapes, for devices that need them (NPU).

The artifacts stay the dynamic IRs the component specs describe; a static build adds a plan to each runtime model's
config (kiln.runtime.static): every input's shape at each built image size, one row per compiled call. The build
checks the plan on this machine's CPU (each component's outputs at a built size through the static models against the
same IR's dynamic ones, several rows so the calls are split) and reports the figures beside the parity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from build.convert import Variant
from build.specs import ComponentSpec
from kiln.errors import ConfigError
from kiln.runtime.static import StaticPlan

STATIC_BATCH = 1  # rows per compiled call: NPUs take one image at a time best, and it bounds their memory


def parse_size(text: str) -> tuple[int, int]:
    """`--static-size` as (width, height): "512" (square) or "768x512" (width x height)."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--static-size {text!r} is not a size; give a side (512) or width x height (768x512)")
    width = int(parts[0])
    return width, int(parts[-1])


def check_static_variant(sizes: Sequence, variants: Sequence[Variant], triton_backend: str) -> None:
    """Refuse, before anything is built, a static build of what cannot have one."""
    if not sizes:
        return
    others = sorted({v.runtime for v in variants if v.runtime != "openvino"})
    if others:
        raise ConfigError(f"--static-size compiles OpenVINO models at fixed shapes; this build serves "
                          f"{', '.join(others)} (choose an openvino-* variant)")
    if triton_backend != "python":
        raise ConfigError("--static-size is the embedded Python backend's (kiln.runtime.static): NVIDIA's image runs "
                          "OpenVINO with dynamic shapes on its CPU")


def size_label(width: int, height: int) -> str:
    return f"{width}x{height}"


def static_plan(spec: ComponentSpec, sizes: Mapping[str, Mapping[str, int]]) -> StaticPlan:
    """The plan of one component: {size label: every axis's size at that image size} -> its inputs' static shapes,
    `STATIC_BATCH` rows, axes other than the batch and the image's at their largest (padded inputs)."""
    batched = tuple(t.name for t in spec.inputs if t.shape and t.shape[0] == "batch")
    padded = tuple(t.name for t in spec.inputs if t.shape and isinstance(t.shape[0], str) and t.name not in batched)
    longest = {t.shape[0]: spec.profile[t.shape[0]][2] for t in spec.inputs if t.name in padded}
    shapes: list[dict[str, tuple[int, ...]]] = []
    for axes in sizes.values():
        concrete = dict(axes) | {"batch": STATIC_BATCH} | longest  # padded inputs at their largest: any call fits
        shape = {t.name: t.concrete_shape(concrete) for t in spec.inputs}
        if shape not in shapes:
            shapes.append(shape)
    labels = tuple(sizes) if len(shapes) == len(sizes) else ()  # one shape set for every size: no size to name
    return StaticPlan(STATIC_BATCH, batched, padded, tuple(shapes), labels)


def check_static(spec: ComponentSpec, path: Path, variant: Variant, plan: StaticPlan,
                 sizes: Mapping[str, int]) -> dict:
    """The static models' outputs against the dynamic IR's on the same inputs at one built size (3 rows: split into
    calls of the plan's batch; textual-inversion vectors fewer than the static length: padded); raise ParityError
    outside the variant's tolerance; the figures and the plan for the report."""
    from build import parity
    from build.convert import open_session
    from kiln.runtime import Session, SessionOptions

    inputs = spec.sample_inputs(seed=3, **(dict(sizes) | {"batch": 3, "vectors": 5}))
    dynamic = open_session(variant, path).run(inputs, spec.output_names)
    static = Session(SessionOptions(variant.runtime, Path(path), inference_precision=variant.inference_precision,
                                    static_shapes=plan.to_json())).run(inputs, spec.output_names)
    figures = {name: parity.compare(dynamic[name], static[name]) for name in spec.output_names}
    parity.check(f"{spec.name} static ({spec.reference_output})", figures[spec.reference_output],
                 spec.tolerance(variant.tolerance_key))
    return {"batch": plan.batch, "shapes": [{k: list(v) for k, v in s.items()} for s in plan.shapes],
            "vs_dynamic": {k: v.as_dict() for k, v in figures.items()}}
