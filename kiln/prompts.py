"""Prompt tokenization with AUTOMATIC1111's chunking: prompts past 75 tokens are never silently cut.

A prompt's tokens (without BOS/EOS) are split into chunks of 75; each chunk becomes
BOS + chunk + EOS, padded with EOS to 77, and the text encoder's outputs of the chunks are
concatenated along the sequence axis (77 x n). As in AUTOMATIC1111, when a chunk fills up and a
comma lies within its last 20 tokens, the chunk ends after that comma and the rest moves on
(`comma_padding_backtrack`). A prompt and its negative prompt are padded to the same number of
chunks with empty chunks, so classifier-free guidance can batch them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import InputError, WeightsError

CHUNK_TOKENS = 75  # tokens of text per chunk; + BOS + EOS = the encoder's 77 positions
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default comma_padding_backtrack
MAX_CHUNKS = 8  # 8 x 75 = 600 prompt tokens per request: the text encoder's sequence profile
CLIP_VOCAB_SIZE = 49408  # SD 1.x's CLIP tokenizer


@dataclass(frozen=True)
class PromptTokens:
    ids: np.ndarray  # (chunks, 77) int64, BOS/EOS added, EOS-padded
    token_count: int  # text tokens, BOS/EOS excluded (what A1111's UI shows as "n/75")

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[0])


def tokenize_prompt(tokenizer, text: str, *, chunk_tokens: int = CHUNK_TOKENS,
                    comma_backtrack: int = COMMA_BACKTRACK) -> PromptTokens:
    """`text` -> every one of its tokens, in chunks of 77 ids."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1  # index of the last comma in `current`, as AUTOMATIC1111 tracks it
    for token in ids:
        if token == comma:
            last_comma = len(current)
        elif (comma_backtrack and len(current) == chunk_tokens and last_comma != -1
              and len(current) - last_comma <= comma_backtrack):
            # The chunk is full: end it after its last comma; the words after the comma move on.
            chunks.append(current[:last_comma + 1])
            current = current[last_comma + 1:]
            last_comma = -1
        if len(current) == chunk_tokens:
            chunks.append(current)
            current = []
            last_comma = -1
        current.append(token)
    if current or not chunks:
        chunks.append(current)
    rows = [[bos, *chunk, *([eos] * (chunk_tokens + 1 - len(chunk)))] for chunk in chunks]
    return PromptTokens(ids=np.asarray(rows, dtype=np.int64), token_count=len(ids))


def empty_chunk(tokenizer, chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """The ids of an empty prompt: BOS then EOS padding."""
    return np.asarray([[tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (chunk_tokens + 1)], dtype=np.int64)


def pad_to_same_chunks(tokenizer, *prompts: PromptTokens) -> list[np.ndarray]:
    """Pad each prompt's ids with empty chunks to the largest chunk count (positive and negative prompts)."""
    target = max(p.chunks for p in prompts)
    filler = empty_chunk(tokenizer)
    return [np.concatenate([p.ids, np.repeat(filler, target - p.chunks, axis=0)]) if p.chunks < target else p.ids
            for p in prompts]


def tokenize_batch(tokenizer, prompts: list[str], max_chunks: int = MAX_CHUNKS) -> tuple[np.ndarray, int]:
    """All prompts of one request (a prompt and its negative prompt) as ids (len(prompts) * chunks, 77), padded to
    the same number of chunks, and that number; more than `max_chunks` chunks is an InputError naming the count."""
    tokens = [tokenize_prompt(tokenizer, p) for p in prompts]
    longest = max(t.chunks for t in tokens)
    if longest > max_chunks:
        raise InputError(f"prompt of {max(t.token_count for t in tokens)} tokens needs {longest} chunks; "
                         f"the limit is {max_chunks}")
    return np.concatenate(pad_to_same_chunks(tokenizer, *tokens)), longest


def check_tokenizer(tokenizer, source: str, vocab_size: int = CLIP_VOCAB_SIZE) -> None:
    """Guard against the silent 2-token tokenizer that from_pretrained(<hub id>) can return offline."""
    if len(tokenizer) != vocab_size:
        raise WeightsError(f"tokenizer from {source} has {len(tokenizer)} tokens, expected {vocab_size} (SD 1.x CLIP)")


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
