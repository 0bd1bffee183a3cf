"""The components in process: runtime sessions over a built repository's artifacts (or any callables).

The same loop as the service runs, minus the transport: parity tests run in seconds, `kiln bench
sd` times each variant's loop, and the build measures a lower precision's images against fp32.
By default each component opens what its Triton model serves (its config.pbtxt's parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kiln import contract as names
from kiln.contract import DEFAULT_MODELS, SDContract, SDModels, ServedControlNet, ServedUpscaler, read_sd_contract
from kiln.embeddings import EmbeddingLibrary
from kiln.errors import InputError
from kiln.imaging import to_uint8, vae_input
from kiln.lora import LoraLibrary
from kiln.model_config import read_served
from kiln.prompts import EmbeddingLookup, apply_emphasis, load_tokenizer, tokenize_weighted_batch
from orchestrator.pipeline.components import CLIP_SKIP_NOT_BUILT, Components, NetworkUpscaler, first_chunks

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]  # inputs -> every output, by name
REQUIRED = ("text_encoder", "unet", "vae_decoder")  # what txt2img needs


def components_in(repository: Path, contract: SDContract | None = None,
                  models: SDModels = DEFAULT_MODELS) -> list[str]:
    """The SD components a checkpoint's build serves: txt2img's, then the VAE encoder and ControlNet ones where
    built."""
    contract = contract or read_sd_contract(repository, models)
    optional = ["vae_encoder"] + (["unet_control"] + [c.component for c in contract.controlnets]
                                  if contract.controlnets else []) + \
        [f"vae_{part}{v.suffix}" for v in contract.vaes for part in ("decoder", "encoder")] + \
        ([f"{part}{names.TILING}" for part in ("unet", "vae_decoder", "vae_encoder")] if contract.tiling else [])
    return [*REQUIRED, *(c for c in optional if (Path(repository) / models.component(c) / "config.pbtxt").exists())]


class LoraRunner:
    """A session's run, and (`with_lora`) the run of the same artifact with a LoRA set (kiln.runtime.lora)."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.sessions.base.run(inputs)

    def with_lora(self, spec: str) -> Runner:
        return self.sessions.session(spec).run


def _with_lora(runner: Runner, spec: str) -> Runner:
    if not spec:
        return runner
    if not hasattr(runner, "with_lora"):
        raise InputError("LoRA: these in-process components run no LoRA (their runners are not the build's sessions)")
    return runner.with_lora(spec)


def session_runners(repository: Path, runtime: str | None = None, artifact: str | None = None,
                    inference_precision: str | None = None, paths: Mapping[str, Path] | None = None,
                    components: Sequence[str] | None = None, lora_folder: Path | None = None,
                    models: SDModels = DEFAULT_MODELS) -> tuple[dict[str, Runner], dict[str, str]]:
    """{component: Runner} over runtime sessions, and the precision each really computes in.

    Each component opens what its model serves (the parameters of its config.pbtxt); `runtime`,
    `artifact` and `inference_precision` override that for all, and `paths` names a component's
    file directly. An artifact with a LoRA map runs LoRA sets of files under `lora_folder` (`LoraRunner`).
    `models`: the checkpoint's (in a repository of several).
    """
    from kiln.runtime import Session, SessionOptions, served_device
    from kiln.runtime.lora import LoraSessions, read_map

    runners, precision = {}, {}
    for component in components or components_in(repository, models=models):
        folder = Path(repository) / models.component(component)
        served = read_served(folder / "config.pbtxt")
        path = (paths or {}).get(component) or folder / "1" / (artifact or served.artifact)
        device = served_device(served)
        if runtime or artifact or component in (paths or {}):  # another artifact than the served one: its own layout
            device |= {"channels_last": False, "torch_compile": False}
        session = Session(SessionOptions(runtime or served.runtime, path,
                                         inference_precision=inference_precision or served.inference_precision,
                                         static_shapes=served.static_shapes if not (runtime or artifact) else "",
                                         **device))
        runners[component] = LoraRunner(LoraSessions(session, lora_folder)) if read_map(path) is not None \
            else session.run
        precision[component] = session.execution_precision
    return runners, precision


@dataclass
class LocalGraph:
    key: str
    runner: Runner

    def with_lora(self, spec: str) -> LocalGraph:
        return LocalGraph(f"{self.key} lora={spec}", _with_lora(self.runner, spec)) if spec else self

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()})["noise_pred"]


class LocalTextEncoder:
    def __init__(self, tokenizer, runner: Runner, max_chunks: int, clip_skip_layers: int = 0,
                 textual_inversion_dim: int = 0, embeddings: EmbeddingLibrary | None = None,
                 text_split: int = 0, pooled: bool = False) -> None:
        self.tokenizer, self.runner, self.max_chunks = tokenizer, runner, max_chunks
        self.text_split = text_split  # SDXL's: the first encoder's width (SDContract.text_split)
        self.pooled = pooled  # SDXL's: the encoder gives the pooled text too (SDContract.time_ids)
        self.clip_skip_layers = clip_skip_layers  # 0: a build before clip skip (its encoder takes input_ids only)
        self.textual_inversion_dim = textual_inversion_dim  # 0: a build before embeddings (no token_vectors)
        self.embeddings = embeddings  # the textual-inversion embeddings prompts may name

    def encode(self, prompts: Sequence[str], clip_skip: int = 1, lora: str = "") -> np.ndarray:
        return self.encode_pooled(prompts, clip_skip, lora)[0]

    def encode_pooled(self, prompts: Sequence[str], clip_skip: int = 1, lora: str = "") -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        """As sd_text_encode: the same selection, lookup and tokenization as the Triton path, in process."""
        named = self.embeddings.select(prompts, self.textual_inversion_dim) if self.embeddings is not None else {}
        lookup = EmbeddingLookup(self.tokenizer, named, self.textual_inversion_dim) \
            if self.textual_inversion_dim else None
        ids, weights, chunks = tokenize_weighted_batch(self.tokenizer, list(prompts), self.max_chunks, lookup)
        inputs = {"input_ids": ids}
        if self.clip_skip_layers:
            inputs["clip_skip"] = np.full(len(ids), clip_skip, dtype=np.int64)
        elif clip_skip != 1:
            raise InputError(CLIP_SKIP_NOT_BUILT)
        if lookup is not None:
            inputs["token_vectors"] = lookup.vectors
        out = _with_lora(self.runner, lora)(inputs)
        hidden = apply_emphasis(out["last_hidden_state"], weights, self.text_split)
        return (hidden.reshape(len(prompts), chunks * hidden.shape[1], hidden.shape[2]),
                first_chunks(out["pooler_output"], len(prompts)) if self.pooled else None)


class LocalVAE:
    def __init__(self, decoder: Runner, encoder: Runner | None = None) -> None:
        self.decoder, self.encoder = decoder, encoder

    def encode_image(self, data: bytes, width: int, height: int) -> np.ndarray:
        return self.encode_pixels(vae_input(data, width, height)[None])

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            raise NotImplementedError("these in-process components have no VAE encoder")
        return np.array(self.encoder({"image": np.ascontiguousarray(pixels, dtype=np.float32)})["moments"])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return to_uint8(self.decode_pixels(latents))

    def decode_pixels(self, latents: np.ndarray) -> np.ndarray:
        return self.decoder({"latent": np.ascontiguousarray(latents, dtype=np.float32)})["image"]


@dataclass
class LocalControlNet:
    served: ServedControlNet
    runner: Runner
    fused: None = None  # no ensemble in process: residuals, then the UNet that takes them

    def residuals(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()})


def local_upscalers(repository: Path) -> dict[ServedUpscaler, NetworkUpscaler]:
    """The repository's upscaler networks (kiln build upscaler), each over a runtime session of its artifact."""
    from kiln.model_config import read_parameters
    from kiln.runtime import Session, SessionOptions

    found = {}
    for folder in sorted(Path(repository).glob(names.UPSCALER_PREFIX + "*")):
        if (folder / "config.pbtxt").exists():
            served, (params, _) = read_served(folder / "config.pbtxt"), read_parameters(folder / "config.pbtxt")
            upscaler = ServedUpscaler.from_parameters(folder.name, params)
            session = Session(SessionOptions(served.runtime, folder / "1" / served.artifact))
            found[upscaler] = NetworkUpscaler(upscaler.name, upscaler.scale,
                                              lambda pixels, run=session.run: run({"image": pixels})["upscaled"])
    return found


def local_components(repository: Path, runners: Mapping[str, Runner] | None = None,
                     embeddings: EmbeddingLibrary | None = None, loras: LoraLibrary | None = None,
                     models: SDModels = DEFAULT_MODELS) -> Components:
    """A checkpoint's SD build in process (`models`: its names; the repository's default checkpoint unless given):
    `runners` (default: sessions over what each model serves); `embeddings`: the textual-inversion embeddings
    prompts may name; `loras`: the LoRA files (their folder)."""
    contract = read_sd_contract(repository, models)
    upscalers: dict[ServedUpscaler, NetworkUpscaler] = {}
    if runners is None:
        runners, _ = session_runners(repository, lora_folder=loras.folder if loras is not None else None,
                                     models=models)
        upscalers = local_upscalers(repository)
    missing = [c for c in REQUIRED if c not in runners]
    if missing:
        raise KeyError(f"in-process components need runners for {', '.join(missing)}")
    controlnets = {c.name: LocalControlNet(c, runners[c.component]) for c in contract.controlnets
                   if c.component in runners and "unet_control" in runners}
    # The contract describes what these components can run: a ControlNet without its runner is not served here.
    contract = replace(contract, controlnets=tuple(c for c in contract.controlnets if c.name in controlnets),
                       vaes=tuple(v for v in contract.vaes if f"vae_decoder{v.suffix}" in runners),
                       tiling=contract.tiling and f"unet{names.TILING}" in runners,
                       upscalers=tuple(upscalers))
    tokenizer = load_tokenizer(Path(repository) / models(names.SD_TOKENIZER) / "1" / "tokenizer")
    return Components(
        contract=contract,
        text_encoder=LocalTextEncoder(tokenizer, runners["text_encoder"], contract.max_prompt_chunks,
                                      contract.clip_skip_layers, contract.textual_inversion_dim, embeddings,
                                      contract.text_split, bool(contract.time_ids)),
        unet=LocalGraph(models(names.SD_UNET), runners["unet"]),
        vae=LocalVAE(runners["vae_decoder"], runners.get("vae_encoder")),
        unet_control=LocalGraph(models(names.SD_UNET_CONTROL), runners["unet_control"])
        if "unet_control" in runners else None,
        controlnets=controlnets, loras=loras,
        vaes={v.name: LocalVAE(runners[f"vae_decoder{v.suffix}"], runners.get(f"vae_encoder{v.suffix}"))
              for v in contract.vaes if f"vae_decoder{v.suffix}" in runners},
        unet_tiling=LocalGraph(models(names.SD_UNET + names.TILING), runners[f"unet{names.TILING}"])
        if contract.tiling else None,
        vae_tiling=LocalVAE(runners[f"vae_decoder{names.TILING}"], runners.get(f"vae_encoder{names.TILING}"))
        if contract.tiling else None,
        upscalers={served.name: network for served, network in upscalers.items()})
