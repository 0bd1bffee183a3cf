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


# The refiner's aesthetic scores: the prompt's and the negative prompt's (diffusers' and AUTOMATIC1111's defaults)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def added_time_ids(width: int, height: int, rows: int, count: int = 6, negative_first: bool = False) -> np.ndarray:
    """SDXL's added time ids for an image of width x height: original size, crop top-left, and target size (h, w;
    `count` 6, the base's) or the aesthetic score (5, the refiner's: the negative prompt's row, first, its own)."""
    if count == 6:
        return np.tile(np.array([height, width, 0, 0, height, width], dtype=np.float32), (rows, 1))
    ids = np.tile(np.array([height, width, 0, 0, AESTHETIC_SCORE], dtype=np.float32), (rows, 1))
    if negative_first:
        ids[0, 4] = NEGATIVE_AESTHETIC_SCORE
    return ids


def encode(text_encoder, prompts: list[str], clip_skip: int, lora: str, *, time_ids: int, width: int,
           height: int, zero_first: bool = False) -> Conditioning:
    """The prompts' conditioning, a row each (with CFG, the negative prompt first). SDXL (`time_ids`: how many the
    UNet takes): with its pooled text and time ids; `zero_first`: the first prompt is the empty negative prompt,
    zeros."""
    if not time_ids:
        return Conditioning(text_encoder.encode(prompts, clip_skip, lora))
    context, pooled = text_encoder.encode_pooled(prompts, clip_skip, lora)
    if zero_first:
        context, pooled = context.copy(), pooled.copy()
        context[0], pooled[0] = 0, 0
    ids = added_time_ids(width, height, len(prompts), time_ids, negative_first=len(prompts) > 1)
    return Conditioning(context, {"text_embeds": pooled, "time_ids": ids})

