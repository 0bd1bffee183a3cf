"""What the UNet is conditioned on: the prompts' text encoding and, for SDXL, its added conditions.

SD 1.x and 2.x condition on the text encoding alone. SDXL adds, per row, the pooled text (its second text encoder's
projection, of a prompt's first 77-token chunk, as AUTOMATIC1111) and six time ids: the original size, the crop's
top-left corner and the target size, which AUTOMATIC1111 and diffusers both set to the image's size, (0, 0) and the
image's size. An empty negative prompt is zeros for SDXL, text and pooled (diffusers' force_zeros_for_empty_prompt,
AUTOMATIC1111's force_zero_negative_prompt), never the encoding of "".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Conditioning:
    """Rows of the UNet's conditioning: encoder_hidden_states, and the added inputs (SDXL's text_embeds, time_ids)."""

    context: np.ndarray  # (rows, 77 * chunks, hidden)
    added: Mapping[str, np.ndarray] = field(default_factory=dict)  # name -> (rows, ...)

    def __len__(self) -> int:
        return len(self.context)

    def repeat(self, count: int) -> Conditioning:
        """Each row `count` times in place (a prompt's row for each image of a batch)."""
        return Conditioning(np.repeat(self.context, count, axis=0),
                            {name: np.repeat(value, count, axis=0) for name, value in self.added.items()})

    def inputs(self, rows: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs, of the rows `rows` selects."""
        return {"encoder_hidden_states": rows(self.context)} | {name: rows(v) for name, v in self.added.items()}


def time_ids(width: int, height: int, rows: int) -> np.ndarray:
    """SDXL's added time ids for an image of width x height: original size, crop top-left, target size (h, w)."""
    return np.tile(np.array([height, width, 0, 0, height, width], dtype=np.float32), (rows, 1))


def encode(text_encoder, prompts: list[str], clip_skip: int, lora: str, *, two_encoders: bool, width: int,
           height: int, zero_first: bool = False) -> Conditioning:
    """The prompts' conditioning, a row each. SDXL (`two_encoders`): with its pooled text and time ids; `zero_first`:
    the first prompt is the empty negative prompt, zeros."""
    if not two_encoders:
        return Conditioning(text_encoder.encode(prompts, clip_skip, lora))
    context, pooled = text_encoder.encode_pooled(prompts, clip_skip, lora)
    if zero_first:
        context, pooled = context.copy(), pooled.copy()
        context[0], pooled[0] = 0, 0
    return Conditioning(context, {"text_embeds": pooled, "time_ids": time_ids(width, height, len(prompts))})
