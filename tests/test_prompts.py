"""Long prompts are chunked as AUTOMATIC1111 does, never cut."""

from __future__ import annotations

import numpy as np
import pytest

from build.sd.weights import clip_tokenizer
from kiln.errors import WeightsError
from kiln.prompts import load_tokenizer, pad_to_same_chunks, tokenize_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def _body(ids: np.ndarray, tokenizer) -> list[int]:
    """The text tokens of all chunks, BOS and EOS padding removed."""
    out = []
    for row in ids:
        assert row[0] == tokenizer.bos_token_id and len(row) == 77
        body = list(row[1:])
        while body and body[-1] == tokenizer.eos_token_id:
            body.pop()
        out += body
    return out


def test_short_prompt_is_one_padded_chunk(tokenizer):
    tokens = tokenize_prompt(tokenizer, "a photo of a cat")
    assert tokens.chunks == 1 and tokens.token_count == 5
    assert tokens.ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tokens.ids[0, 7:] == 49407).all()


def test_empty_prompt(tokenizer):
    tokens = tokenize_prompt(tokenizer, "")
    assert tokens.chunks == 1 and tokens.token_count == 0


def test_long_prompt_keeps_every_token(tokenizer):
    text = " ".join(["a very detailed photo of a cat"] * 40)  # 280 tokens, no commas
    tokens = tokenize_prompt(tokenizer, text)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokens.token_count == len(expected) == 280
    assert tokens.chunks == 4  # 75 + 75 + 75 + 55
    assert _body(tokens.ids, tokenizer) == expected


def test_chunks_break_after_a_nearby_comma(tokenizer):
    words = ["cat"] * 70 + [","] + ["dog"] * 10  # comma at index 70: the first chunk ends there
    tokens = tokenize_prompt(tokenizer, " ".join(words))
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    first = _body(tokens.ids[:1], tokenizer)
    assert len(first) == 71 and first[-1] == comma
    assert _body(tokens.ids, tokenizer) == tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]


def test_far_comma_does_not_break(tokenizer):
    words = ["cat"] * 30 + [","] + ["dog"] * 60  # comma 45 tokens before the end of the chunk: no backtrack
    tokens = tokenize_prompt(tokenizer, " ".join(words))
    assert len(_body(tokens.ids[:1], tokenizer)) == 75


def test_prompt_and_negative_are_padded_to_the_same_chunks(tokenizer):
    positive = tokenize_prompt(tokenizer, "a cat " * 60)
    negative = tokenize_prompt(tokenizer, "blurry")
    padded = pad_to_same_chunks(tokenizer, positive, negative)
    assert padded[0].shape == padded[1].shape == (2, 77)
    assert (padded[1][1, 1:] == tokenizer.eos_token_id).all()


PROMPTS = ["a photo of a cat", "", "A  PHOTO\tof\n\na Cat!!", "café naïve résumé Ⅻ 東京 🐱",
           "(masterpiece:1.2), [bad], <lora:x:0.5>", "it's they're we'll I'd", "1234567890 3.14",
           ", ".join(f"word{i}" for i in range(120)), "<|endoftext|> literal"]


def test_the_serving_tokenizer_gives_transformers_ids(tokenizer, tmp_path):
    """The Triton model and the in-process pipeline tokenize with `tokenizers` alone (no transformers in the serving
    image); on the build's saved tokenizer they must give exactly transformers' ids."""
    tokenizer.save_pretrained(str(tmp_path))
    light = load_tokenizer(tmp_path)
    assert len(light) == len(tokenizer)
    assert (light.bos_token_id, light.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert light.convert_tokens_to_ids(",</w>") == tokenizer.convert_tokens_to_ids(",</w>")
    for prompt in PROMPTS:
        for special in (False, True):
            assert light(prompt, add_special_tokens=special)["input_ids"] == \
                tokenizer(prompt, add_special_tokens=special, truncation=False)["input_ids"], prompt
        assert np.array_equal(tokenize_prompt(light, prompt).ids, tokenize_prompt(tokenizer, prompt).ids)


def test_a_folder_without_tokenizer_json_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(WeightsError, match="is not a tokenizer"):
        load_tokenizer(tmp_path)
