"""`kiln bench sd`: Stable Diffusion per component and per image, torch eager fp32 as the baseline of the same run.

For each variant (torch eager fp32; ONNX Runtime fp32 and dynamic int8; OpenVINO fp32, bf16 hint,
fp16 weights, int8 weights, and int8-hybrid, whose UNet is calibrated on inputs captured from
denoising runs as `kiln build sd` does), derived from the build's fp32 ONNX files, each in its own
process so its peak memory is its own (a mix, `openvino-int8-hybrid+vae=openvino-bf16` (build.sd.mix), runs each
part in its own variant, from the same derived files as the plain variants of the run):

- per-component latency on the shapes of one 512x512 txt2img request: the text encoder on the
  CFG pair of prompts (batch 2), one UNet step with CFG (batch 2), the VAE decoder (batch 1);
- the direct loop: the orchestrator's own denoising loop (`Pipeline.generate`: diffusers'
  scheduler, CFG, the same noise) over in-process components instead of Triton ones, timed for
  one `--steps`-step image;
- parity with torch eager fp32 on the same inputs: cosine and max abs difference per component,
  and the PSNR of the generated image against torch's image from the same seed.

Then the build's served repository (ONNX Runtime fp32) through the embedded Triton: the same
request through `Pipeline.generate` over gRPC, against the direct ONNX Runtime loop of the
same run (the Triton + orchestrator overhead), with the Triton process tree's peak memory.

Writes results/sd-<pipeline>-<side>.json, .md and .png (benchmarks/sd_report.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.load import write_results
from benchmarks.sd_report import BASELINE, markdown_table, plot, summarize
from build.parity import psnr
from build.sd.mix import parse_mix
from kiln import contract as names
from kiln.contract import read_sd_contract
from kiln.errors import ConfigError, KilnError
from orchestrator.pipeline import Pipeline, Txt2ImgRequest
from orchestrator.pipeline.components.local import REQUIRED as COMPONENTS
from orchestrator.pipeline.components.local import session_runners

VARIANTS = ("torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-fp16",
            "openvino-int8", "openvino-int8-hybrid", "torch-aoti-fp32", "torch-aoti-bf16")  # torch eager, then
# build.convert.SD_VARIANTS (AOTInductor: the components exported by torch.export and compiled for this CPU)
DEFAULT_VARIANTS = ("torch-fp32", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8",
                    "torch-aoti-fp32")
PIPELINES = {"tiny": (64, (32, 64, 128)), "full": (512, (256, 512, 768))}  # default side, (min, opt, max)
PROMPT, NEGATIVE, SEED = "a photo of a cat", "blurry", 42


@dataclass(frozen=True)
class SDBenchOptions:
    out: Path
    pipeline: str = "full"
    size: int = 0  # image side; 0: the pipeline's default (512 full, 64 tiny)
    steps: int = 20  # steps of the measured images (direct loops and Triton)
    repeats: int = 3  # timed calls per component, after one warm-up call
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    triton: bool = True
    skip_build: bool = False
    family: str = "sd1"  # build.sd.families: sd1, sd2, sdxl

    @property
    def name(self) -> str:
        """The run's name: its folder's and its results' (sd1 unnamed, as before families)."""
        return self.pipeline if self.family == "sd1" else f"{self.family}-{self.pipeline}"

    @property
    def side(self) -> int:
        return self.size or PIPELINES[self.pipeline][0]


# -- artifacts ----------------------------------------------------------------------------------

def artifact_path(root: Path, repo: Path, variant: str, component: str) -> Path:
    """The build's fp32 ONNX file, or where the benchmark derives the component's artifact from it (one file per
    component and variant key: a mix shares its parts' files with the plain variants of the run)."""
    onnx = repo / names.sd_model(component) / "1" / "model.onnx"
    mix = parse_mix(variant, allow_auto=False)
    served, key = mix.variant(component), mix.key(component)
    if key == "onnxruntime-fp32" or (served.runtime == "openvino" and served.precision in ("fp32", "bf16")):
        return onnx  # OpenVINO reads ONNX files itself: no IR copy of the fp32 weights on disk
    return root / "artifacts" / key / f"{component}{Path(served.artifact).suffix}"


def served_variant(variant: str, component: str):
    """What a component runs in `variant` (a key, or a mix: build.sd.mix), as the build derives it (only the UNet is
    calibrated)."""
    return parse_mix(variant, allow_auto=False).variant(component)


# -- one variant, in its own process ------------------------------------------------------------

def _peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident set (VmHWM) in MB; NaN when the kernel does not report it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# The output parity compares, per component (each component's inputs are its exported module's, in order).
OUTPUT_NAMES = {"text_encoder": "last_hidden_state", "unet": "noise_pred", "vae_decoder": "image"}
EVERY_OUTPUT = {"text_encoder": ("last_hidden_state", "pooler_output")}  # what the loop reads (SDXL: the pooled text)


def component_inputs(repo: Path, weights: Path, side: int) -> dict[str, dict[str, np.ndarray]]:
    """Seeded inputs of one side x side txt2img request with CFG, from the checkpoint's configs (no weights loaded)."""
    contract = read_sd_contract(repo)
    text = json.loads((weights / "text_encoder" / "config.json").read_text())
    latent = side // contract.vae_scale_factor
    channels, length = contract.latent_channels, int(text["max_position_embeddings"])
    hidden = contract.textual_inversion_dim or text["hidden_size"]  # SDXL's: both encoders side by side
    rng = np.random.default_rng(1)
    added = {}
    if contract.text_split:  # SDXL's pooled text and time ids
        pooled = json.loads((weights / "text_encoder_2" / "config.json").read_text())["projection_dim"]
        added = {"text_embeds": rng.standard_normal((2, pooled), dtype=np.float32),
                 "time_ids": np.tile(np.array([side, side, 0, 0, side, side], np.float32), (2, 1))}
    return {
        "text_encoder": {"input_ids": rng.integers(0, text["vocab_size"], (2, length), dtype=np.int64),
                         "clip_skip": np.ones(2, dtype=np.int64),
                         "token_vectors": np.zeros((1, hidden), dtype=np.float32)},  # no embedding
        "unet": {"sample": rng.standard_normal((2, contract.unet_in_channels, latent, latent), dtype=np.float32),
                 "timestep": np.full(2, 500.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, length, hidden), dtype=np.float32), **added},
        "vae_decoder": {"latent": rng.standard_normal((1, channels, latent, latent), dtype=np.float32)},
    }


def _runners(variant: str, root: Path, repo: Path, weights: Path) -> tuple[dict, dict]:
    """{component: inputs -> outputs}, and what each runtime really computes in."""
    if variant == BASELINE:
        import torch

        from build.sd.export import export_modules
        from build.sd.weights import load_sd

        torch.set_num_threads(os.cpu_count() or 1)
        modules = export_modules(load_sd(str(weights)))

        def runner(component: str):
            module = modules[component]

            def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # component_inputs' order: the module's
                with torch.inference_mode():
                    out = module(*(torch.from_numpy(np.ascontiguousarray(value)) for value in inputs.values()))
                outputs = EVERY_OUTPUT.get(component, (OUTPUT_NAMES[component],))
                return {name: value.numpy() for name, value in zip(outputs, out if isinstance(out, tuple) else (out,))}
            return run
        return {c: runner(c) for c in COMPONENTS}, {c: "f32" for c in COMPONENTS}

    runners, precision = {}, {}
    for component in COMPONENTS:  # each in its own runtime (a mix's parts may differ)
        kind = served_variant(variant, component)
        one, executes = session_runners(repo, kind.runtime, inference_precision=kind.inference_precision,
                                        paths={component: artifact_path(root, repo, variant, component)},
                                        components=(component,))
        runners |= one
        precision |= executes
    return runners, precision


def measure_variant(variant: str, root: Path, repo: Path, weights: Path, side: int, steps: int, repeats: int) -> dict:
    """Load, time the components and one image, compare with the baseline's saved outputs."""
    from build import parity

    inputs = component_inputs(repo, weights, side)
    start = time.perf_counter()
    runners, precision = _runners(variant, root, repo, weights)
    result = {"variant": variant, "load_s": time.perf_counter() - start, "executed_precision": precision,
              "components": {}}
    outputs = {}
    for component in COMPONENTS:
        run = runners[component]
        outputs[component] = run(inputs[component])[OUTPUT_NAMES[component]]  # warm-up (and the parity sample)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(inputs[component])
            times.append(time.perf_counter() - t0)
        result["components"][component] = {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
                                           "repeats": repeats}
    timed = CallTimer()
    pipeline = Pipeline.from_repository(repo, {c: timed.wrap(run) for c, run in runners.items()})
    pipeline.generate(bench_request(side, 1))  # warm-up: imports and first calls of the loop itself, as for Triton
    request = bench_request(side, steps)
    timed.reset()
    t0 = time.perf_counter()
    image = pipeline.generate(request).images[0]
    result["image_s"] = time.perf_counter() - t0
    # The time spent inside the models during that image, and so the loop's own share (scheduler, CFG, ...).
    result["model_calls_s"], result["model_calls"] = timed.seconds, timed.calls
    result["image_steps"] = steps
    reference = root / "reference.npz"
    if variant == BASELINE:
        np.savez(reference, image=image, **{c: outputs[c] for c in COMPONENTS})
    elif reference.exists():
        ref = np.load(reference)
        result["parity"] = {c: parity.compare(ref[c], outputs[c]).as_dict() for c in COMPONENTS}
        result["parity"]["image_psnr_db"] = psnr(ref["image"], image)
    np.save(root / f"image-{variant}.npy", image)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


class CallTimer:
    """Wraps callables to add up the wall time spent inside them (what a loop spends in its models)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


def bench_request(side: int, steps: int) -> Txt2ImgRequest:
    return Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler="Euler a", cfg_scale=7.0,
                          seed=SEED, width=side, height=side)


def _worker_main(argv: list[str]) -> None:
    """python -m benchmarks.sd measure|derive ...: one variant in a fresh process; prints one JSON line."""
    mode, config = argv[0], json.loads(argv[1])
    if mode == "derive":
        from benchmarks.sd_derive import derive_component

        made = derive_component(served_variant(config["variant"], config["component"]), config,
                                PIPELINES[config["pipeline"]][1])
        print("RESULT " + json.dumps(made | {"peak_rss_mb": _peak_rss_mb()}))
    else:
        result = measure_variant(config["variant"], Path(config["root"]), Path(config["repo"]), Path(config["weights"]),
                                 config["side"], config["steps"], config["repeats"])
        print("RESULT " + json.dumps(result))


def _in_subprocess(mode: str, config: dict, log) -> dict:
    command = [sys.executable, "-m", "benchmarks.sd", mode, json.dumps(config)]
    proc = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        hint = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise KilnError(f"bench sd: {mode} {config.get('variant')} failed with exit code {proc.returncode}{hint}:"
                        f"\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


# -- the benchmark ------------------------------------------------------------------------------

def _prepare(options: SDBenchOptions, log) -> tuple[Path, Path, Path]:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint

    root = options.out / f"bench_sd_{options.name.replace('-', '_')}"
    weights, repo = root / "weights", root / "repo"
    if not (weights / "model_index.json").exists():
        log(f"writing the seeded random {options.pipeline} {options.family} checkpoint to {weights} ...")
        write_sd_checkpoint(weights, size=options.pipeline, seed=0, controlnet=False, family_name=options.family)
    if not (options.skip_build and (repo / names.SD_UNET / "config.pbtxt").exists()):
        low, opt, high = PIPELINES[options.pipeline][1]
        log(f"building the {options.pipeline} SD pipeline into {repo} ...")
        build_sd(SDBuildOptions(weights=str(weights), repository=repo, images=ImageRange(low, opt, high)), log=log)
    return root, weights, repo


def _known(variant: str) -> bool:
    """Whether the benchmark can run `variant`: one of VARIANTS, or a mix of them."""
    try:
        return set(parse_mix(variant, allow_auto=False).keys()) <= set(VARIANTS)
    except ConfigError:
        return False


def run_sd_benchmark(options: SDBenchOptions, log=print) -> dict:
    from tqdm import tqdm

    if options.pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {options.pipeline!r}; valid: {', '.join(PIPELINES)}")
    unknown = [v for v in options.variants if not _known(v)]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}, each optionally "
                          "followed by +PART=VARIANT (build.sd.mix: openvino-int8-hybrid+vae=openvino-bf16)")
    variants = [BASELINE] + [v for v in options.variants if v != BASELINE]  # the baseline first: parity needs it
    root, weights, repo = _prepare(options, log)
    (root / "reference.npz").unlink(missing_ok=True)
    results, derived, failed, made, broken = [], {}, {}, set(), set()
    bar = tqdm(total=len(variants) + options.triton, desc="bench sd", unit="variant")
    for variant in variants:
        bar.set_postfix(variant=variant)
        try:
            for component in COMPONENTS if variant != BASELINE else ():
                target = artifact_path(root, repo, variant, component)
                if target in broken:  # never an older file in its place
                    raise KilnError(f"bench sd: {variant} needs {target}, whose derive failed above")
                if target.parent != repo / names.sd_model(component) / "1" and target not in made \
                        and not (options.skip_build and target.exists()):
                    try:
                        derived.setdefault(variant, {})[component] = _in_subprocess("derive", {
                            "variant": variant, "component": component, "repo": str(repo), "side": options.side,
                            "weights": str(weights), "pipeline": options.pipeline,
                            "source": str(artifact_path(root, repo, "onnxruntime-fp32", component)),
                            "target": str(target)}, log)
                    except KilnError:
                        broken.add(target)
                        raise
                    made.add(target)  # a mix's part made once in a run
            results.append(_in_subprocess("measure", {
                "variant": variant, "root": str(root), "repo": str(repo), "weights": str(weights),
                "side": options.side, "steps": options.steps, "repeats": options.repeats}, log))
        except KilnError as exc:
            if variant == BASELINE:
                raise
            log(f"!! {variant}: {exc}")  # one variant failing (out of memory, say) does not lose the others
            failed[variant] = str(exc)
        bar.update()
    triton = None
    if options.triton:
        bar.set_postfix(variant="triton")
        from benchmarks.sd_triton import measure_triton

        triton = measure_triton(root, repo, options.side, options.steps, log)
        bar.update()
    bar.close()
    result = summarize(results, triton, derived, options) | {"failed": failed}
    stem = options.out / f"sd-{options.name}-{options.side}"
    return write_results(stem, result, markdown_table, plot, log)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
