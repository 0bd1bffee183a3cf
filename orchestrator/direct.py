"""The orchestrator's denoising loop with the models called in-process instead of through Triton.

`DirectDiffusion` is `TritonDiffusion` with its three model calls (text encoder, UNet, VAE
decoder) replaced by Python callables: the same tokenizer chunking, scheduler, CFG, noise and
postprocessing, so the only difference from the served path is the transport. `kiln bench sd`
uses it as the "direct" baseline of the Triton overhead and to time each variant; `kiln build sd`
uses it to measure a lower-precision variant's images against fp32 (PSNR).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.diffusion import TritonDiffusion
from orchestrator.images import to_uint8

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]  # inputs -> the component's first output
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
OUTPUT_NAMES = {"text_encoder": "last_hidden_state", "unet": "noise_pred", "vae_decoder": "image"}


def unet_parameters(repository: Path) -> dict[str, str]:
    """sd_unet's config parameters: what the loop needs to know about the build."""
    from build.triton_config import read_config

    config = read_config(Path(repository) / "sd_unet" / "config.pbtxt")
    return {k: v.string_value for k, v in config.parameters.items()}


def session_runners(repository: Path, runtime: str | None = None, artifact: str | None = None,
                    inference_precision: str | None = None, paths: dict[str, Path] | None = None) -> tuple[dict, dict]:
    """{component: Runner} over runtime sessions, and the precision each really computes in.

    By default each component opens what its model in `repository` serves (the parameters of its
    config.pbtxt); `runtime`, `artifact` and `inference_precision` override that, and `paths` names
    each component's file directly.
    """
    from build.runtime import Session, SessionOptions
    from build.triton_config import read_config

    runners, precision = {}, {}
    for component in COMPONENTS:
        folder = Path(repository) / f"sd_{component}"
        params = {k: v.string_value for k, v in read_config(folder / "config.pbtxt").parameters.items()}
        path = (paths or {}).get(component) or folder / "1" / (artifact or params["artifact"])
        session = Session(SessionOptions(runtime or params["runtime"], path,
                                         inference_precision=inference_precision or params.get("inference_precision",
                                                                                               "f32")))
        runners[component] = _runner(session, OUTPUT_NAMES[component])
        precision[component] = session.execution_precision
    return runners, precision


def _runner(session, output: str) -> Runner:
    return lambda inputs: session.run(inputs, [output])[output]


class DirectDiffusion(TritonDiffusion):
    """TritonDiffusion's loop over in-process runners; configured from the repository's sd_unet parameters."""

    def __init__(self, repository: Path, runners: dict[str, Runner]) -> None:  # no Triton client
        from transformers import CLIPTokenizer

        self._configure(unet_parameters(repository), unet_max_batch=16)
        self.has_controlnet = False  # the direct loop runs the plain UNet only
        self.runners = runners
        self.tokenizer = CLIPTokenizer.from_pretrained(str(Path(repository) / "sd_tokenizer" / "1" / "tokenizer"))

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        from orchestrator.prompts import pad_to_same_chunks, tokenize_prompt

        ids = pad_to_same_chunks(self.tokenizer, *(tokenize_prompt(self.tokenizer, p) for p in prompts))
        chunks = ids[0].shape[0]
        hidden = self.runners["text_encoder"]({"input_ids": np.concatenate(ids)})
        return hidden.reshape(len(prompts), chunks * hidden.shape[1], hidden.shape[2])

    def noise_pred(self, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if model != "sd_unet":
            raise NotImplementedError(f"DirectDiffusion runs the plain UNet only, not {model}")
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        feed["timestep"] = feed["timestep"].reshape(-1)  # the exported UNet takes (batch,); Triton's (batch, 1)
        return self.runners["unet"](feed)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        decoded = self.runners["vae_decoder"]({"latent": np.ascontiguousarray(latents, dtype=np.float32)})
        return to_uint8(decoded)  # as sd_vae_postprocess does

