r"""Prompt tokenization with AUTOMATIC1111's prompt language and chunking: prompts past 75 tokens are never cut.

Emphasis is parsed as AUTOMATIC1111 parses it (`parse_emphasis`): `(word)` multiplies the attention to its words
by 1.1, `[word]` divides it by 1.1, `(word:1.3)` sets 1.3, nesting multiplies, `\(` and `\[` are literal
brackets, and `BREAK` ends the current chunk. Each fragment is tokenized on its own; every token carries its weight
into the chunk, and `apply_emphasis` scales the text encoder's output by them and restores its mean (per prompt and
chunk), as AUTOMATIC1111 does. A prompt whose weights are all 1 encodes exactly as its plain text. Prompt editing
`[from:to:when]` and alternation `[a|b]` choose the text of each step, and composable diffusion (`a AND b :0.5`)
splits a prompt into parts (kiln.prompt_schedule); what reaches the tokenizer is one part's text at one step. What
kiln does not run is refused by name (`check_prompt_syntax`): extra-network tags other than the prompt's LoRA tags
(kiln.lora takes those out first), AND outside a prompt, and an editing bracket that does not parse (`[cat:dog]`: no
step); never encoded as literal text.

A prompt's tokens (without BOS/EOS) are split into chunks of 75; each chunk becomes
BOS + chunk + EOS, padded to 77 (with EOS for SD 1.x, with "!" for SD 2.x), and the text encoder's outputs of the
chunks are concatenated along the sequence axis (77 x n). As in AUTOMATIC1111, when a chunk fills up and a
comma lies within its last 20 tokens, the chunk ends after that comma and the rest moves on
(`comma_padding_backtrack`). A prompt and its negative prompt are padded to the same number of
chunks with empty chunks, so classifier-free guidance can batch them.

Textual-inversion embeddings are found as AUTOMATIC1111 finds them (`EmbeddingLookup`): an embedding's name, used
as a word, is the token ids of its name in a fragment; those tokens are replaced by the embedding's n vectors (n
positions, never split across chunks, carrying the fragment's weight), which reach the text encoder as rows of its
`token_vectors` input, pointed at by `token_vector_id`. A word that names no embedding stays text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import InputError, WeightsError
from kiln.prompt_schedule import AND, composable, edits, leftover

CHUNK_TOKENS = 75  # tokens of text per chunk; + BOS + EOS = the encoder's 77 positions
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default comma_padding_backtrack
MAX_CHUNKS = 8  # 8 x 75 = 600 prompt tokens per request: the text encoder's sequence profile
CLIP_VOCAB_SIZE = 49408  # SD 1.x's CLIP tokenizer


BREAK = "BREAK"  # the marker parse_emphasis returns for BREAK (with weight -1, as AUTOMATIC1111's parser)
_ATTENTION = re.compile(r"""
    \\[()\[\]\\]? |             # an escape: \( \) \[ \] \\ (or a lone backslash)
    \( | \[ |                    # opening brackets
    :\s*([+-]?[.\d]+)\s*\) |       # the end of (text:weight)
    \) | \] |                    # closing brackets
    [^\\()\[\]:]+ |               # text
    :                            # a colon that is text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]*)>")  # AUTOMATIC1111's extra-network tags: <lora:name:0.8>
_EDITING = re.compile(r"\[[^\[\]()]*[:|][^\[\]()]*\]")  # a bracket that looks like [from:to:when] or [a|b]


def check_prompt_syntax(text: str, field: str = "prompt", parts: bool = False) -> None:
    """Refuse, by name, the parts of AUTOMATIC1111's prompt language kiln does not run (InputError: HTTP 422).
    `parts`: the text may hold AND (a prompt, not a negative prompt, nor one part the text encoder takes)."""
    plain = re.sub(r"\\.", "", text)  # escaped brackets are text
    if match := EXTRA_NETWORK.search(plain):
        where = "the prompt only (as AUTOMATIC1111 applies them)" if match.group(1).lower() in ("lora", "lyco") \
            else "LoRA tags (<lora:name:multiplier>) only, in the prompt"
        raise InputError(f"{field}: {match.group(0)} is an extra-network tag ({match.group(1)}); kiln applies {where}, "
                         "and a tag is never taken as text")
    if not parts and AND.search(plain):
        raise InputError(f"{field}: AND (composable diffusion) is the prompt's (and hr_prompt's), each of its parts "
                         "encoded on its own; AUTOMATIC1111 takes it as a word here: write 'and'")
    for part, _ in composable(text) if parts else [(text, 1.0)]:  # AUTOMATIC1111 splits at AND, then parses
        _check_editing(part, field)


def _check_editing(text: str, field: str) -> None:
    """Refuse a bracket that looks like prompt editing or alternation but is neither (it would be read as emphasis)."""
    if match := _EDITING.search(re.sub(r"\\.", "", leftover(text))):  # what no edit or alternation took
        if edits(match.group(0)):  # valid alone: the rest of the prompt is not
            why = "the prompt does not parse: a | outside [a|b], or a backslash at its end"
        elif "|" in match.group(0):
            why = "alternation is [a|b|...], its options without colons"
        else:
            why = "prompt editing is [from:to:when] or [to:when], when a step number or a fraction such as 0.5"
        raise InputError(f"{field}: {match.group(0)} is not valid prompt editing or alternation ({why}); escape "
                         "the brackets (\\[ \\]) to write them as text")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """`text` as [(fragment, weight)], the way AUTOMATIC1111's parse_prompt_attention reads it; BREAK is
    (BREAK, -1). Unbalanced brackets apply to the end of the text; runs of the same weight are merged."""
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] != -1:
                fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:
                raise InputError(f"prompt: {weight!r} is not a number (in {token.strip()!r})") from None
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    fragments.append([BREAK, -1.0])
                fragments.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for fragment in fragments:
        if merged and fragment[1] == merged[-1][1] and fragment[1] != -1:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def token_vector_id(row):
    """The input id that makes the text encoder take row `row` of its `token_vectors` (a textual-inversion vector)
    instead of a token's embedding: -1 - row, never a token id. Its own inverse: token_vector_id(id) is the row."""
    return -1 - row


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray, split: int = 0) -> np.ndarray:
    """AUTOMATIC1111's emphasis on the text encoder's output: each position (chunk, 77, hidden) scaled by its token's
    weight, then the chunk rescaled to its original mean. All weights 1: `hidden` itself. `split`: SDXL's encoding
    holds two encoders' outputs side by side, the first `split` wide; each is rescaled to its own mean."""
    if np.all(weights == 1):
        return hidden
    if split:
        return np.concatenate([apply_emphasis(hidden[..., :split], weights),
                               apply_emphasis(hidden[..., split:], weights)], axis=-1)
    original = hidden.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    scaled = hidden * weights[:, :, None].astype(hidden.dtype)
    return (scaled * (original / scaled.mean(axis=(1, 2), keepdims=True, dtype=np.float64))).astype(hidden.dtype)


@dataclass(frozen=True)
class PromptTokens:
    ids: np.ndarray  # (chunks, 77) int64, BOS/EOS added, padded (pad_token_id); token_vector_id(k) where a vector goes
    token_count: int  # text positions, BOS/EOS excluded (what A1111's UI shows as "n/75"; n per embedding)
    weights: np.ndarray | None = None  # (chunks, 77) float32: each position's emphasis (1 for BOS, EOS, padding)

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[0])


class EmbeddingLookup:
    """Textual-inversion embeddings ({name: (n, hidden) vectors}) found in prompts by their names' token ids, as
    AUTOMATIC1111's EmbeddingDatabase finds them (the longest name first where several start alike). One lookup
    serves one request: `vectors` (the text encoder's `token_vectors`) holds the vectors of the embeddings found,
    in the order first found (one zero row when none is), and the ids point into it."""

    def __init__(self, tokenizer, embeddings: Mapping[str, np.ndarray], hidden: int,
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
        self.hidden = hidden
        self._vectors: list[np.ndarray] = []
        self._by_first: dict[int, list[tuple[tuple[int, ...], int]]] = {}  # first id -> [(name's ids, index)]
        for index, (name, vectors) in enumerate(embeddings.items()):
            if vectors.ndim != 2 or vectors.shape[1] != hidden or not 1 <= len(vectors) <= chunk_tokens:
                raise InputError(f"embedding {name!r}: its vectors are {vectors.shape}; this text encoder takes 1 to "
                                 f"{chunk_tokens} vectors of {hidden}")
            self._vectors.append(np.asarray(vectors, dtype=np.float32))
            ids = tuple(tokenizer(name, add_special_tokens=False, truncation=False)["input_ids"])
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, index))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda entry: len(entry[0]), reverse=True)
        self._rows: dict[int, int] = {}  # embedding index -> its first row in `vectors`, in the order first found

    @property
    def vectors(self) -> np.ndarray:
        found = [self._vectors[index] for index in self._rows]
        return np.concatenate(found) if found else np.zeros((1, self.hidden), dtype=np.float32)

    def _markers(self, index: int) -> list[int]:
        if index not in self._rows:
            self._rows[index] = sum(len(self._vectors[i]) for i in self._rows)
        return [token_vector_id(self._rows[index] + j) for j in range(len(self._vectors[index]))]

    def items(self, ids: list[int], weight: float) -> list[list[tuple[int, float]]]:
        """One fragment's token ids as items: a token's one position, or the positions of an embedding's vectors."""
        items, position = [], 0
        while position < len(ids):
            for name_ids, index in self._by_first.get(ids[position], ()):
                if tuple(ids[position:position + len(name_ids)]) == name_ids:
                    items.append([(marker, weight) for marker in self._markers(index)])
                    position += len(name_ids)
                    break
            else:
                items.append([(ids[position], weight)])
                position += 1
        return items


def tokenize_prompt(tokenizer, text: str, *, embeddings: EmbeddingLookup | None = None,
                    chunk_tokens: int = CHUNK_TOKENS, comma_backtrack: int = COMMA_BACKTRACK) -> PromptTokens:
    """`text` (AUTOMATIC1111's prompt language) -> every one of its tokens, in chunks of 77 ids, with their weights;
    the names of `embeddings` become their vectors' positions."""
    if AND.search(re.sub(r"\\.", "", text)):
        raise InputError(f"prompt {text!r} holds AND: the text encoder takes one of its parts (kiln.prompt_schedule."
                         "composable splits it; the orchestrator sends each one)")
    check_prompt_syntax(text)
    if edits(text):
        raise InputError(f"prompt {text!r} holds prompt editing or alternation: the text encoder takes one step's "
                         "text (kiln.prompt_schedule chooses it; the orchestrator sends each one)")
    items: list[list[tuple[int, float]] | None] = []  # the positions of one token or one embedding; None: BREAK
    for fragment, weight in parse_emphasis(text):
        if weight == -1 and fragment == BREAK:
            items.append(None)
        elif fragment:
            ids = tokenizer(fragment, add_special_tokens=False, truncation=False)["input_ids"]
            items += embeddings.items(ids, weight) if embeddings is not None else [[(t, weight)] for t in ids]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    last_comma = -1  # index of the last comma in `current`, as AUTOMATIC1111 tracks it
    for item in items:
        if item is None:  # BREAK: this chunk ends here (padded), the next one starts
            chunks.append(current)
            current, last_comma = [], -1
            continue
        if item[0][0] == comma:
            last_comma = len(current)
        elif (comma_backtrack and len(current) == chunk_tokens and last_comma != -1
              and len(current) - last_comma <= comma_backtrack):
            # The chunk is full: end it after its last comma; the words after the comma move on.
            chunks.append(current[:last_comma + 1])
            current = current[last_comma + 1:]
            last_comma = -1
        if len(current) + len(item) > chunk_tokens:  # full, or an embedding that would not fit: never split
            chunks.append(current)
            current = []
            last_comma = -1
        current += item
    if current or not chunks:
        chunks.append(current)
    pad = pad_token_id(tokenizer)
    rows = [[bos, *(t for t, _ in chunk), eos, *([pad] * (chunk_tokens - len(chunk)))] for chunk in chunks]
    weights = [[1.0, *(w for _, w in chunk), *([1.0] * (chunk_tokens + 1 - len(chunk)))] for chunk in chunks]
    return PromptTokens(ids=np.asarray(rows, dtype=np.int64), token_count=sum(len(i) for i in items if i),
                        weights=np.asarray(weights, dtype=np.float32))


def empty_chunk(tokenizer, chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """The ids of an empty prompt: BOS, EOS, then padding."""
    return np.asarray([[tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad_token_id(tokenizer)] * chunk_tokens],
                      dtype=np.int64)


def pad_token_id(tokenizer) -> int:
    """What follows a chunk's end token: the end token again (SD 1.x, AUTOMATIC1111's id_end) or the tokenizer's own
    padding ("!" for SD 2.x's OpenCLIP, as diffusers and AUTOMATIC1111's id_pad)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return tokenizer.eos_token_id if pad is None else pad


def pad_to_same_chunks(tokenizer, *prompts: PromptTokens) -> list[np.ndarray]:
    """Pad each prompt's ids with empty chunks to the largest chunk count (positive and negative prompts)."""
    target = max(p.chunks for p in prompts)
    filler = empty_chunk(tokenizer)
    return [np.concatenate([p.ids, np.repeat(filler, target - p.chunks, axis=0)]) if p.chunks < target else p.ids
            for p in prompts]


def tokenize_weighted_batch(tokenizer, prompts: list[str], max_chunks: int = MAX_CHUNKS,
                            embeddings: EmbeddingLookup | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """All prompts of one request (a prompt and its negative prompt) as ids (len(prompts) * chunks, 77), padded to
    the same number of chunks, each position's emphasis weight (same shape, float32) and that number of chunks;
    more than `max_chunks` chunks is an InputError naming the count. Ids below 0 point into `embeddings.vectors`
    (read it after this call: it holds the vectors found)."""
    tokens = [tokenize_prompt(tokenizer, p, embeddings=embeddings) for p in prompts]
    longest = max(t.chunks for t in tokens)
    if longest > max_chunks:
        raise InputError(f"prompt of {max(t.token_count for t in tokens)} tokens needs {longest} chunks; "
                         f"the limit is {max_chunks}")
    weights = [np.concatenate([t.weights, np.ones((longest - t.chunks, t.weights.shape[1]), np.float32)])
               for t in tokens]
    return np.concatenate(pad_to_same_chunks(tokenizer, *tokens)), np.concatenate(weights), longest


def embedding_tensors(embeddings: Mapping[str, np.ndarray], hidden: int) -> dict[str, np.ndarray]:
    """The embeddings a request uses as sd_text_encode's inputs (none: zero-length tensors, which Triton takes):
    their names, how many vectors each has, and those vectors one after the other."""
    vectors = [np.asarray(v, dtype=np.float32).reshape(-1, hidden) for v in embeddings.values()]
    return {"embedding_names": np.array([name.encode() for name in embeddings], dtype=object),
            "embedding_sizes": np.array([len(v) for v in vectors], dtype=np.int32),
            "embedding_vectors": np.concatenate(vectors) if vectors else np.zeros((0, hidden), np.float32)}


def embeddings_from_tensors(names: np.ndarray, sizes: np.ndarray, vectors: np.ndarray) -> dict[str, np.ndarray]:
    """`embedding_tensors` read back: {name: its vectors}; tensors that disagree are an InputError."""
    names, sizes = names.reshape(-1), sizes.reshape(-1).astype(np.int64)
    if len(names) != len(sizes) or (sizes < 1).any() or int(sizes.sum()) != len(vectors):
        raise InputError(f"embeddings: {len(names)} names, sizes {sizes.tolist()} and {len(vectors)} vectors "
                         "do not agree")
    if not np.isfinite(vectors).all():
        raise InputError("embeddings: the vectors hold NaN or infinity")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return {(n.decode("utf-8") if isinstance(n, bytes) else str(n)): vectors[a:b]
            for n, a, b in zip(names, starts[:-1], starts[1:])}


def check_tokenizer(tokenizer, source: str, vocab_size: int = CLIP_VOCAB_SIZE) -> None:
    """Guard against the silent 2-token tokenizer that from_pretrained(<hub id>) can return offline."""
    if len(tokenizer) != vocab_size:
        raise WeightsError(f"tokenizer from {source} has {len(tokenizer)} tokens, expected {vocab_size} (CLIP's)")


class ClipTokenizer:
    """SD's CLIP tokenizer from the `tokenizer.json` a build saves, with the `tokenizers` library alone.

    transformers' CLIPTokenizer runs the same file through the same library; this keeps transformers (and its
    import time) out of the Triton models and the serving image. It offers what the functions above use.
    """

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise WeightsError(f"{folder} has no tokenizer.json (rebuild the repository: `kiln build sd` saves one)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for an unreadable file
            raise WeightsError(f"{path} is not a tokenizer: {exc}") from exc
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token_id = self._special(config.get("bos_token", "<|startoftext|>"))
        self.eos_token_id = self._special(config.get("eos_token", "<|endoftext|>"))
        self.pad_token_id = self._special(config.get("pad_token") or config.get("eos_token", "<|endoftext|>"))

    def _special(self, token: str | dict) -> int:
        content = token["content"] if isinstance(token, dict) else token
        token_id = self._tokenizer.token_to_id(content)
        if token_id is None:
            raise WeightsError(f"the tokenizer has no {content!r} token")
        return token_id

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False) -> dict[str, list[int]]:
        if truncation:
            raise ValueError("ClipTokenizer never truncates (prompts are chunked)")
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def load_tokenizer(folder: str | Path) -> ClipTokenizer:
    """The CLIP tokenizer a build saved (`<repository>/sd_tokenizer/1/tokenizer`), checked: the full vocabulary."""
    tokenizer = ClipTokenizer(folder)
    check_tokenizer(tokenizer, str(folder))
    return tokenizer
