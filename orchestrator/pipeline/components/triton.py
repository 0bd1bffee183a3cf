"""The components over Triton: every model runs in the server, the contract comes from sd_unet's config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from kiln import contract as names
from kiln.contract import DEFAULT_MODELS, SDContract, SDModels, ServedControlNet, ServedUpscaler, base_name
from kiln.embeddings import EmbeddingLibrary
from kiln.errors import InputError, KilnError, NotFoundError, ServerError
from kiln.lora import LoraLibrary
from kiln.prompts import apply_emphasis, embedding_tensors
from kiln.triton_client import TritonClient
from orchestrator.pipeline.components import CLIP_SKIP_NOT_BUILT, Components, NetworkUpscaler, first_chunks

_ROW_SCALARS = ("timestep", "conditioning_scale")  # (rows,) here, (rows, 1) on the wire


@dataclass
class TritonGraph:
    """A batched model (sd_unet, sd_unet_control, an ensemble) called on float32 rows, split into batches it takes."""

    client: TritonClient
    model: str  # the model's name
    max_batch: int
    outputs: tuple[str, ...] = ("noise_pred",)
    out_channels: int | None = None  # noise_pred's channels (the latents'): it comes back through shared memory
    lora: str = ""  # the LoRA spec every row runs with (its `lora` input; "": not sent)

    @property
    def key(self) -> str:
        return f"{self.model} lora={self.lora}" if self.lora else self.model

    def with_lora(self, spec: str) -> TritonGraph:
        return replace(self, lora=spec)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.rows(inputs)["noise_pred"]

    def rows(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(inputs["sample"])
        parts = []
        for start in range(0, rows, self.max_batch):
            chunk = {name: np.ascontiguousarray(value[start:start + self.max_batch], dtype=np.float32)
                     for name, value in inputs.items()}
            for name in _ROW_SCALARS:
                if name in chunk:
                    chunk[name] = chunk[name].reshape(-1, 1)
            if self.lora:
                chunk["lora"] = np.full((len(chunk["sample"]), 1), self.lora.encode(), dtype=object)
            shapes = None
            if self.out_channels is not None:
                rows_in, _, height, width = chunk["sample"].shape
                shapes = {"noise_pred": (rows_in, self.out_channels, height, width)}
            parts.append(self.client.infer(self.model, chunk, list(self.outputs), output_shapes=shapes))
        return {name: np.concatenate([part[name] for part in parts]) for name in self.outputs}


class TritonTextEncoder:
    def __init__(self, client: TritonClient, clip_skip_layers: int = 0, textual_inversion_dim: int = 0,
                 embeddings: EmbeddingLibrary | None = None, models: SDModels = DEFAULT_MODELS,
                 text_split: int = 0, pooled: bool = False) -> None:
        self.client = client
        self.text_split = text_split  # SDXL's: the first encoder's width (SDContract.text_split)
        self.pooled = pooled  # SDXL's: the ensemble gives the pooled text too (SDContract.time_ids)
        self.model = models(names.SD_TEXT_ENCODE)
        self.clip_skip_layers = clip_skip_layers  # 0: a build before clip skip (its ensemble takes prompts only)
        self.textual_inversion_dim = textual_inversion_dim  # 0: a build before embeddings (no vectors go with them)
        self.embeddings = embeddings  # the service's embeddings folder: the vectors the prompts name go to Triton

    def encode(self, prompts: Sequence[str], clip_skip: int = 1, lora: str = "") -> np.ndarray:
        return self._encode(prompts, clip_skip, lora)[0]

    def encode_pooled(self, prompts: Sequence[str], clip_skip: int = 1, lora: str = "") -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        context, out = self._encode(prompts, clip_skip, lora)
        return context, first_chunks(out["pooled"], len(prompts))

    def _encode(self, prompts: Sequence[str], clip_skip: int, lora: str) -> tuple[np.ndarray, dict]:
        inputs = {"prompt": np.array([p.encode() for p in prompts], dtype=object)}
        if lora:  # only then: a build before LoRA has no such input (the pipeline refuses LoRA for it)
            inputs["lora"] = np.array([lora.encode()], dtype=object)
        if self.clip_skip_layers:
            inputs["clip_skip"] = np.array([clip_skip], dtype=np.int32)
        elif clip_skip != 1:
            raise InputError(CLIP_SKIP_NOT_BUILT)
        named = self.embeddings.select(prompts, self.textual_inversion_dim) if self.embeddings is not None else {}
        if self.textual_inversion_dim:
            inputs |= embedding_tensors(named, self.textual_inversion_dim)
        out = self.client.infer(self.model, inputs, ["embeddings", "chunks", "weights"]
                                + (["pooled"] if self.pooled else []))
        chunks = int(out["chunks"][0])
        embeddings = apply_emphasis(out["embeddings"], out["weights"], self.text_split)  # (prompts * chunks, 77, _)
        return embeddings.reshape(len(prompts), chunks * embeddings.shape[1], embeddings.shape[2]), out


class TritonVAE:
    def __init__(self, client: TritonClient, suffix: str = "", models: SDModels = DEFAULT_MODELS) -> None:
        self.client = client
        self.models = models.vae(suffix)  # the checkpoint's VAE (""), or one of the build's others

    def encode_image(self, data: bytes, width: int, height: int) -> np.ndarray:
        try:
            out = self.client.infer(self.models["encode"], {"image": np.array([[data]], dtype=object),
                                                          "size": np.array([[height, width]], dtype=np.int32)},
                                    ["moments"])
        except InputError as exc:
            raise InputError(f"init image: {exc}") from None
        return np.array(out["moments"])  # a writable copy: torch refuses read-only buffers

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        out = self.client.infer(self.models["encoder"], {"image": np.asarray(pixels, dtype=np.float32)}, ["moments"])
        return np.array(out["moments"])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.client.infer(self.models["decode"], {"latent": np.asarray(latents, dtype=np.float32)},
                                 ["image"])["image"]

    def decode_pixels(self, latents: np.ndarray) -> np.ndarray:
        return self.client.infer(self.models["decoder"], {"latent": np.asarray(latents, dtype=np.float32)},
                                 ["image"])["image"]


class TritonControlNet:
    def __init__(self, client: TritonClient, served: ServedControlNet, max_batch: int,
                 out_channels: int | None = None) -> None:
        self.served = served
        self.client = client
        self.max_batch = max_batch
        self.fused = TritonGraph(client, served.ensemble, max_batch, out_channels=out_channels) \
            if served.ensemble else None
        self._graph: TritonGraph | None = None

    def residuals(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._graph is None:  # the residuals' names, from the model's own config
            outputs = tuple(o["name"] for o in self.client.model_config(self.served.model)["output"])
            self._graph = TritonGraph(self.client, self.served.model, self.max_batch, outputs)
        return self._graph.rows(inputs)


def read_contract(client: TritonClient, models: SDModels = DEFAULT_MODELS) -> SDContract:
    """A checkpoint's SD build's contract, from its sd_unet's config as Triton serves it."""
    try:
        params, max_batch = client.model_parameters(models(names.SD_UNET))
    except KilnError as exc:  # whatever Triton answers, generation cannot start: the service is unavailable
        raise ServerError(f"{exc} (generation needs a repository built with `kiln build sd`)") from None
    contract = SDContract.from_parameters(params, max_batch)
    if "controlnets" not in params and client.is_model_ready(names.sd_model(names.controlnet_component(0))):
        # Built before several ControlNets: at most the one, under the first ControlNet's names.
        contract = replace(contract, controlnets=(ServedControlNet("controlnet"),))
    return contract


def served_checkpoints(client: TritonClient) -> list[SDModels]:
    """The checkpoints whose SD builds Triton has ready (their sd_unet): the repository's default first, then the
    others by name."""
    found = [SDModels.of(m) for m in client.ready_models() if base_name(m) == names.SD_UNET]
    return sorted(found, key=lambda models: models.checkpoint)  # "" (the default) sorts first


def find_checkpoint(client: TritonClient, name: str) -> SDModels:
    """The served checkpoint a name, title or build name picks; NotFoundError listing the served titles."""
    served = {models: read_contract(client, models) for models in served_checkpoints(client)}
    for models, contract in served.items():
        if name.strip() in (contract.title, contract.model_name, models.checkpoint or None):
            return models
    titles = ", ".join(repr(c.title) for c in served.values())
    raise NotFoundError(f"checkpoint {name!r}: no such model; Triton serves {titles or 'none'}")


def triton_components(url: str, *, timeout_s: float = 600.0, shared_memory: str = "auto",
                      embeddings: EmbeddingLibrary | None = None, loras: LoraLibrary | None = None,
                      models: SDModels = DEFAULT_MODELS) -> Components:
    """A checkpoint's SD components served by the Triton at `url` (gRPC; `models`: the checkpoint's names, the
    repository's default one unless given); `shared_memory` as kiln.triton_client.TritonClient's (auto: a
    denoising step's tensors travel through shared memory when Triton is on this host); `embeddings`: the
    textual-inversion embeddings prompts may name (the service's folder); `loras`: the LoRA files they may name (the
    service's folder; Triton's models read the same files from theirs, KILN_LORAS)."""
    client = TritonClient(url, "grpc", timeout_s=timeout_s, shared_memory=shared_memory)
    contract = read_contract(client, models)
    upscalers = tuple(ServedUpscaler.from_parameters(m, client.model_parameters(m)[0])
                      for m in client.ready_models(names.UPSCALER_PREFIX))
    contract = replace(contract, upscalers=upscalers)
    batch, channels = contract.unet_max_batch, contract.latent_channels
    controlnets = {c.name: TritonControlNet(client, c, batch, channels) for c in contract.controlnets}
    text_encoder = TritonTextEncoder(client, contract.clip_skip_layers, contract.textual_inversion_dim, embeddings,
                                     models, contract.text_split, bool(contract.time_ids))
    return Components(contract=contract, text_encoder=text_encoder,
                      unet=TritonGraph(client, models(names.SD_UNET), batch, out_channels=channels),
                      vae=TritonVAE(client, models=models),
                      unet_control=TritonGraph(client, models(names.SD_UNET_CONTROL), batch, out_channels=channels)
                      if controlnets else None,
                      controlnets=controlnets, close=client.close, loras=loras,
                      vaes={v.name: TritonVAE(client, v.suffix, models) for v in contract.vaes},
                      unet_tiling=TritonGraph(client, models(names.SD_UNET + names.TILING), batch,
                                              out_channels=channels) if contract.tiling else None,
                      vae_tiling=TritonVAE(client, names.TILING, models) if contract.tiling else None,
                      upscalers={u.name: NetworkUpscaler(u.name, u.scale, _upscaler_runner(client, u.model))
                                 for u in upscalers})


def _upscaler_runner(client: TritonClient, model: str):
    return lambda pixels: client.infer(model, {"image": pixels}, ["upscaled"])["upscaled"]
