"""What the UNet is conditioned on: the prompts' text encoding and, for SDXL, its added conditions.

Prompt editing and alternation (kiln.prompt_schedule) make it change with the step, and AND splits the prompt into
parts of their own rows: `encode_scheduled` encodes each text a prompt takes on its own, and `Scheduled.at(step)`
assembles the rows of that step as AUTOMATIC1111 does (parts padded by their last vector, the negative prompt and the
parts to one length with empty chunks).

SD 1.x and 2.x condition on the text encoding alone. SDXL adds, per row, the pooled text (its second text encoder's
projection, of a prompt's first 77-token chunk, as AUTOMATIC1111) and six time ids: the original size, the crop's
top-left corner and the target size, which AUTOMATIC1111 and diffusers both set to the image's size, (0, 0) and the
image's size. An empty negative prompt is zeros for SDXL, text and pooled (diffusers' force_zeros_for_empty_prompt,
AUTOMATIC1111's force_zero_negative_prompt), never the encoding of "".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from kiln.prompt_schedule import edits, text_at
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


@dataclass(frozen=True)
class Scheduled:
    """Conditioning that changes with the step (prompt editing, alternation) or holds AND's parts: each prompt's
    schedule [(end_at_step, text)] (the negative prompt's first where guided), each text encoded on its own (its own
    chunk count), each row `count` times (the images of a batch). A step's rows are assembled as AUTOMATIC1111
    assembles them: the prompt's parts padded to the longest by repeating their last vector
    (reconstruct_multicond_batch), then the negative prompt and the parts to one length with empty chunks (its
    pad_cond_uncond: what lets one UNet call take both)."""

    texts: Mapping[str, Conditioning]  # each text's encoding: one row, its own length
    schedules: tuple[tuple[tuple[int, str], ...], ...]
    guided: bool
    empty: np.ndarray | None  # the empty chunk's encoding (77, hidden), where lengths differ
    time_ids: np.ndarray | None  # SDXL's, a row per prompt (the negative prompt's first)
    zero_negative: bool = False  # SDXL's empty negative prompt: zeros
    count: int = 1
    _steps: dict = field(default_factory=dict, compare=False, repr=False)  # the rows of each choice of texts

    def __len__(self) -> int:
        return len(self.schedules) * self.count

    def repeat(self, count: int) -> Scheduled:
        return replace(self, count=self.count * count, _steps={})

    def at(self, step: int) -> Conditioning:
        """The rows of denoising step `step` (from 0): each prompt's entry for it (kiln.prompt_schedule.text_at)."""
        chosen = tuple(entries[text_at(entries, step)][1] for entries in self.schedules)
        if chosen not in self._steps:
            self._steps[chosen] = self._assemble([self.texts[text] for text in chosen]).repeat(self.count)
        return self._steps[chosen]

    def _assemble(self, rows: list[Conditioning]) -> Conditioning:
        negative, parts = (rows[0], rows[1:]) if self.guided else (None, rows)
        longest = max(part.context.shape[1] for part in parts)
        contexts = [np.concatenate([part.context, np.repeat(part.context[:, -1:], longest - part.context.shape[1],
                                                            axis=1)], axis=1) for part in parts]
        pooled = [part.added["text_embeds"] for part in parts] if self.time_ids is not None else []
        if negative is not None:
            context = np.zeros_like(negative.context) if self.zero_negative else negative.context
            contexts, context = _same_length(contexts, context, self.empty)
            contexts = [context, *contexts]
            if self.time_ids is not None:
                neg = negative.added["text_embeds"]
                pooled = [np.zeros_like(neg) if self.zero_negative else neg, *pooled]
        added = {"text_embeds": np.concatenate(pooled), "time_ids": self.time_ids} if self.time_ids is not None else {}
        return Conditioning(np.concatenate(contexts), added)


def _same_length(parts: list[np.ndarray], negative: np.ndarray, empty: np.ndarray | None) -> tuple:
    """The parts and the negative prompt padded to one length with empty chunks (AUTOMATIC1111's pad_cond)."""
    gap = parts[0].shape[1] - negative.shape[1]
    if gap == 0:
        return parts, negative
    filler = np.tile(empty, (abs(gap) // len(empty), 1))[None]
    if gap > 0:
        return parts, np.concatenate([negative, filler], axis=1)
    return [np.concatenate([part, filler], axis=1) for part in parts], negative


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
    return any(edits(prompt) for prompt in prompts)


def encode_scheduled(text_encoder, prompts: list[str], clip_skip: int, lora: str, *, steps: int,
                     hires_steps: int | None = None, time_ids: int, width: int, height: int) -> Prompted:
    """The prompts' conditioning (the negative prompt first where guided, then AND's parts) over `steps` editing
    steps (sampling.editing_steps; `hires_steps`: the hires fix's second pass, kiln.prompt_schedule.schedule). A
    negative prompt and one prompt without editing: `encode` of their text, one call, as before."""
    schedules = [prompt_schedule(prompt, steps, hires_steps) for prompt in prompts]
    guided = len(prompts) > 1
    if all(len(entries) == 1 for entries in schedules) and len(prompts) <= 2:
        texts = [entries[0][1] for entries in schedules]
        return encode(text_encoder, texts, clip_skip, lora, time_ids=time_ids, width=width, height=height,
                      zero_first=guided and texts[0] == "")
    encoded = {text: encode(text_encoder, [text], clip_skip, lora, time_ids=time_ids, width=width, height=height)
               for text in dict.fromkeys(text for entries in schedules for _, text in entries)}
    lengths = {conditioning.context.shape[1] for conditioning in encoded.values()}
    return Scheduled(encoded, tuple(tuple(entries) for entries in schedules), guided,
                     empty=text_encoder.encode([""], clip_skip, lora)[0] if len(lengths) > 1 else None,
                     time_ids=added_time_ids(width, height, len(prompts), time_ids, negative_first=guided)
                     if time_ids else None,
                     zero_negative=bool(time_ids) and guided and {text for _, text in schedules[0]} == {""})
