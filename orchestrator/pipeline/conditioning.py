"""What the UNet is conditioned on: the prompts' text encoding and, for SDXL, its added conditions.

Prompt editing and alternation (kiln.prompt_schedule) make it change with the step, and AND splits the prompt into
parts of their own rows: `encode_scheduled` encodes each text a prompt takes on its own, and `Scheduled.at(step)`
assembles the rows of that step as AUTOMATIC1111 does: parts padded by their last vector; where the negative prompt
and the parts still differ in length, by default two UNet calls (`Split`), or padded to one length
(Txt2ImgRequest.pad_conds: its "Pad conds" and "Pad conds v0").

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
from kiln.prompts import CHUNK_TOKENS


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

    def calls(self, skip: int) -> list[tuple[slice, dict[str, np.ndarray]]]:
        """The step's UNet calls: [(their rows of the step's input, their conditioning inputs)]; `skip`: the first
        rows (the negative prompt's) left out (s_min_uncond)."""
        return [(slice(0, None), self.inputs(lambda rows: rows[skip:]))]

    @property
    def padded(self) -> bool:
        """Whether padding made the negative prompt and the prompt one length at some step: a single encoding of
        one chunk each never needs it."""
        return False


@dataclass(frozen=True)
class Split:
    """A step's rows where the negative prompt and the prompt differ in length and nothing pads them
    (AUTOMATIC1111's default): the negative prompt's rows and the prompt's, each run by a UNet call of its own."""

    negative: Conditioning
    prompt: Conditioning

    def __len__(self) -> int:
        return len(self.negative) + len(self.prompt)

    def repeat(self, count: int) -> Split:
        return Split(self.negative.repeat(count), self.prompt.repeat(count))

    def calls(self, skip: int) -> list[tuple[slice, dict[str, np.ndarray]]]:
        prompt = self.prompt.inputs(_all_rows)
        if skip:  # s_min_uncond's steps: the prompt's call alone
            return [(slice(0, None), prompt)]
        rows = len(self.negative)
        return [(slice(0, rows), self.negative.inputs(_all_rows)), (slice(rows, None), prompt)]


def _all_rows(rows: np.ndarray) -> np.ndarray:
    return rows


@dataclass(frozen=True)
class Scheduled:
    """Conditioning that changes with the step (prompt editing, alternation) or holds AND's parts: each prompt's
    schedule [(end_at_step, text)] (the negative prompt's first where guided), each text encoded on its own (its own
    chunk count), each row `count` times (the images of a batch). A step's rows are assembled as AUTOMATIC1111
    assembles them: the prompt's parts padded to the longest by repeating their last vector
    (reconstruct_multicond_batch); then, where the negative prompt's length differs, `pad` (Txt2ImgRequest.pad_conds):
    "off", a `Split` in two UNet calls; "empty_chunks", the shorter padded with empty chunks (pad_cond_uncond);
    "last_vector", the negative prompt padded with its last vector or cut (pad_cond_uncond_v0)."""

    texts: Mapping[str, Conditioning]  # each text's encoding: one row, its own length
    schedules: tuple[tuple[tuple[int, str], ...], ...]
    guided: bool
    empty: np.ndarray | None  # the empty chunk's encoding (77, hidden), where lengths differ
    time_ids: np.ndarray | None  # SDXL's, a row per prompt (the negative prompt's first)
    zero_negative: bool = False  # SDXL's empty negative prompt: zeros
    pad: str = "off"
    count: int = 1
    _steps: dict = field(default_factory=dict, compare=False, repr=False)  # the rows of each choice of texts

    def __len__(self) -> int:
        return len(self.schedules) * self.count

    def repeat(self, count: int) -> Scheduled:
        return replace(self, count=self.count * count, _steps={})

    def at(self, step: int) -> Conditioning | Split:
        """The rows of denoising step `step` (from 0): each prompt's entry for it (kiln.prompt_schedule.text_at)."""
        chosen = self._chosen(step)
        if chosen not in self._steps:
            self._steps[chosen] = self._assemble([self.texts[text] for text in chosen]).repeat(self.count)
        return self._steps[chosen]

    @property
    def padded(self) -> bool:
        """Whether padding made the negative prompt and the prompt one length at some step (AUTOMATIC1111's infotext
        says "Pad conds" or "Pad conds v0" then)."""
        if not self.guided or self.pad == "off":
            return False
        last = max(end for entries in self.schedules for end, _ in entries)
        return any(_uneven([self.texts[text] for text in chosen])
                   for chosen in {self._chosen(step) for step in range(last + 1)})

    def _chosen(self, step: int) -> tuple[str, ...]:
        return tuple(entries[text_at(entries, step)][1] for entries in self.schedules)

    def _assemble(self, rows: list[Conditioning]) -> Conditioning | Split:
        negative, parts = (rows[0], rows[1:]) if self.guided else (None, rows)
        longest = max(part.context.shape[1] for part in parts)
        contexts = [np.concatenate([part.context, np.repeat(part.context[:, -1:], longest - part.context.shape[1],
                                                            axis=1)], axis=1) for part in parts]
        pooled = [part.added["text_embeds"] for part in parts] if self.time_ids is not None else []
        if negative is None:
            return _rows(contexts, pooled, self.time_ids)
        context = np.zeros_like(negative.context) if self.zero_negative else negative.context
        neg = [] if self.time_ids is None else [negative.added["text_embeds"]]
        neg = [np.zeros_like(value) for value in neg] if self.zero_negative else neg
        if self.pad == "off" and _uneven(rows):
            ids = (None, None) if self.time_ids is None else (self.time_ids[:1], self.time_ids[1:])
            return Split(_rows([context], neg, ids[0]), _rows(contexts, pooled, ids[1]))
        if self.pad == "last_vector":
            context = _last_vector(context, longest)
        contexts, context = _same_length(contexts, context, self.empty)
        return _rows([context, *contexts], [*neg, *pooled], self.time_ids)


def _uneven(rows: list[Conditioning]) -> bool:
    """Whether the negative prompt's row (the first) and the prompt's longest part differ in length."""
    return rows[0].context.shape[1] != max(row.context.shape[1] for row in rows[1:])


def _rows(contexts: list[np.ndarray], pooled: list[np.ndarray], time_ids: np.ndarray | None) -> Conditioning:
    added = {"text_embeds": np.concatenate(pooled), "time_ids": time_ids} if time_ids is not None else {}
    return Conditioning(np.concatenate(contexts), added)


def _last_vector(negative: np.ndarray, length: int) -> np.ndarray:
    """AUTOMATIC1111's pad_cond_uncond_v0: the negative prompt padded to `length` with its last vector, or cut."""
    gap = length - negative.shape[1]
    return np.concatenate([negative, np.repeat(negative[:, -1:], gap, axis=1)], axis=1) if gap > 0 \
        else negative[:, :length]


def _same_length(parts: list[np.ndarray], negative: np.ndarray, empty: np.ndarray | None) -> tuple:
    """The parts and the negative prompt padded to one length with empty chunks (AUTOMATIC1111's pad_cond_uncond)."""
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
                     hires_steps: int | None = None, time_ids: int, width: int, height: int,
                     pad: str = "off", old_scheduling: bool = False) -> Prompted:
    """The prompts' conditioning (the negative prompt first where guided, then AND's parts) over `steps` editing
    steps (sampling.editing_steps; `hires_steps`: the hires fix's second pass, kiln.prompt_schedule.schedule; `pad`:
    Txt2ImgRequest.pad_conds; `old_scheduling`: its use_old_scheduling). A negative prompt and one prompt without
    editing, of one chunk each: `encode` of their text, one call; longer, each text on its own (its length decides
    the step's calls and the infotext)."""
    schedules = [prompt_schedule(prompt, steps, hires_steps, old_scheduling) for prompt in prompts]
    guided = len(prompts) > 1
    if all(len(entries) == 1 for entries in schedules) and len(prompts) <= 2:
        texts = [entries[0][1] for entries in schedules]
        together = encode(text_encoder, texts, clip_skip, lora, time_ids=time_ids, width=width, height=height,
                          zero_first=guided and texts[0] == "")
        if not guided or together.context.shape[1] == CHUNK_TOKENS + 2:  # one chunk, BOS and EOS
            return together
    encoded = {text: encode(text_encoder, [text], clip_skip, lora, time_ids=time_ids, width=width, height=height)
               for text in dict.fromkeys(text for entries in schedules for _, text in entries)}
    lengths = {conditioning.context.shape[1] for conditioning in encoded.values()}
    return Scheduled(encoded, tuple(tuple(entries) for entries in schedules), guided,
                     empty=text_encoder.encode([""], clip_skip, lora)[0]
                     if len(lengths) > 1 and pad == "empty_chunks" else None,
                     time_ids=added_time_ids(width, height, len(prompts), time_ids, negative_first=guided)
                     if time_ids else None,
                     zero_negative=bool(time_ids) and guided and {text for _, text in schedules[0]} == {""},
                     pad=pad)
