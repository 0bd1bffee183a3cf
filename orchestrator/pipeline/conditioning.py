"""What the UNet is conditioned on: the prompts' text encoding and, for SDXL, its added conditions.

Prompt editing and alternation (kiln.prompt_schedule) make it change with the step: `encode_scheduled` encodes each
text a prompt takes (a negative prompt and prompt pair per text encoder call, as without editing, padded to one chunk
count with the empty chunk the tokenizer pads with), and `Scheduled.at(step)` gives the rows of that step.

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

from kiln.prompt_schedule import parse, text_at
from kiln.prompt_schedule import schedule as prompt_schedule


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

    def at(self, step: int) -> Conditioning:
        """The rows of a denoising step: the same at every step (no prompt editing)."""
        return self

    def take(self, rows: list[int]) -> Conditioning:
        return Conditioning(self.context[rows], {name: value[rows] for name, value in self.added.items()})


@dataclass(frozen=True)
class Scheduled:
    """Conditioning that changes with the step: each prompt's schedule [(end_at_step, row of `encoded`)] (the
    negative prompt's first), each row `count` times (the images of a batch)."""

    encoded: Conditioning  # a row per (text, prompt)
    schedules: tuple[tuple[tuple[int, int], ...], ...]
    count: int = 1

    def __len__(self) -> int:
        return len(self.schedules) * self.count

    def repeat(self, count: int) -> Scheduled:
        return Scheduled(self.encoded, self.schedules, self.count * count)

    def at(self, step: int) -> Conditioning:
        """The rows of denoising step `step` (from 0): each prompt's entry for it (kiln.prompt_schedule.text_at)."""
        rows = [entries[text_at(entries, step)][1] for entries in self.schedules]
        return self.encoded.take(rows).repeat(self.count)


Prompted = Conditioning | Scheduled  # what a denoising loop is conditioned on: .at(step) gives a step's rows


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



def edited(prompts: list[str]) -> bool:
    """Whether any of `prompts` holds prompt editing or alternation."""
    return any(not isinstance(node, str) for prompt in prompts for node in parse(prompt) or ())


def encode_scheduled(text_encoder, prompts: list[str], clip_skip: int, lora: str, *, steps: int,
                     hires_steps: int | None = None, time_ids: int, width: int, height: int) -> Prompted:
    """The prompts' conditioning (the negative prompt first where guided) over `steps` editing steps (sampling.
    editing_steps; `hires_steps`: the hires fix's second pass, kiln.prompt_schedule.schedule). Prompts without
    editing: `encode` of their text, as before."""
    schedules = [prompt_schedule(prompt, steps, hires_steps) for prompt in prompts]
    guided = len(prompts) > 1
    if all(len(entries) == 1 for entries in schedules):
        texts = [entries[0][1] for entries in schedules]
        return encode(text_encoder, texts, clip_skip, lora, time_ids=time_ids, width=width, height=height,
                      zero_first=guided and texts[0] == "")
    distinct = [list(dict.fromkeys(text for _, text in entries)) for entries in schedules]
    zero_first = guided and distinct[0] == [""]
    calls = max(len(texts) for texts in distinct)
    parts = [encode(text_encoder, [texts[min(call, len(texts) - 1)] for texts in distinct], clip_skip, lora,
                    time_ids=time_ids, width=width, height=height, zero_first=zero_first) for call in range(calls)]
    longest = max(part.context.shape[1] for part in parts)
    if any(part.context.shape[1] < longest for part in parts):  # pad to one chunk count, as one call would
        empty = text_encoder.encode([""], clip_skip, lora)[0]
        parts = [_padded(part, empty, longest, zero_first) for part in parts]
    encoded = Conditioning(np.concatenate([part.context for part in parts]),
                           {name: np.concatenate([part.added[name] for part in parts]) for name in parts[0].added})
    rows = len(prompts)  # call c's row of prompt p: c * rows + p
    return Scheduled(encoded, tuple(tuple((end, texts.index(text) * rows + p) for end, text in entries)
                                    for p, (entries, texts) in enumerate(zip(schedules, distinct))))


def _padded(part: Conditioning, empty: np.ndarray, length: int, zero_first: bool) -> Conditioning:
    """`part`'s text encoding padded with empty chunks to `length` positions (a zeroed negative prompt: zeros)."""
    rows, positions, _ = part.context.shape
    filler = np.tile(empty, ((length - positions) // len(empty), 1))
    context = np.concatenate([part.context, np.broadcast_to(filler, (rows, *filler.shape))], axis=1)
    if zero_first:
        context[0] = 0
    return Conditioning(context, part.added)
