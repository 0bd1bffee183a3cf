"""Long prompts are chunked as AUTOMATIC1111 does, never cut."""

from __future__ import annotations

import re

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
           "(masterpiece:1.2), [bad], <not a tag>", "it's they're we'll I'd", "1234567890 3.14",
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


# -- AUTOMATIC1111's prompt language ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "parsed"), [  # the parse results AUTOMATIC1111 documents (prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a photo of a (cat:1.0)", [("a photo of a cat", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_parses_as_automatic1111(text, parsed):
    from kiln.prompts import parse_emphasis

    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in parsed]
    assert [w for _, w in got] == pytest.approx([w for _, w in parsed])


def test_weights_follow_their_tokens_and_break_starts_a_chunk(tokenizer):
    plain = tokenize_prompt(tokenizer, "a photo of a cat")
    same = tokenize_prompt(tokenizer, "a photo of a (cat:1.0)")
    assert np.array_equal(plain.ids, same.ids) and np.all(same.weights == 1)
    weighted = tokenize_prompt(tokenizer, "a photo of a (cat:1.5) [dog]")
    cat, dog = tokenizer.convert_tokens_to_ids("cat</w>"), tokenizer.convert_tokens_to_ids("dog</w>")
    row, weights = list(weighted.ids[0]), weighted.weights[0]
    assert weights[row.index(cat)] == pytest.approx(1.5) and weights[row.index(dog)] == pytest.approx(1 / 1.1)
    assert weights[0] == 1 and weights[-1] == 1  # BOS and padding carry no emphasis
    broken = tokenize_prompt(tokenizer, "a cat BREAK a dog")
    assert broken.chunks == 2 and broken.token_count == 4
    assert _body(broken.ids[:1], tokenizer) == tokenizer("a cat", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("text", "names"), [
    ("a cat <lora:watercolor:0.8>", "<lora:watercolor:0.8> is an extra-network tag"),
    ("a cat AND a dog", "holds AND: the text encoder takes one of its parts"),
    ("a [cat:dog:0.5]", "holds prompt editing or alternation: the text encoder takes one step's text"),
    ("a [cat|dog]", "holds prompt editing or alternation"),
    ("a [cat:dog]", "[cat:dog] is not valid prompt editing"),
])
def test_what_kiln_does_not_run_is_refused_by_name(tokenizer, text, names):
    from kiln.errors import InputError

    with pytest.raises(InputError, match=re.escape(names)):
        tokenize_prompt(tokenizer, text)
    tokenize_prompt(tokenizer, text.replace("[", "\\[").replace("]", "\\]").replace("<", "").replace("AND", "and"))


def test_emphasis_scales_the_positions_and_restores_the_mean():
    from kiln.prompts import apply_emphasis

    hidden = np.random.default_rng(0).standard_normal((2, 77, 8)).astype(np.float32) + 0.5
    weights = np.ones((2, 77), np.float32)
    assert apply_emphasis(hidden, weights) is hidden  # all 1: untouched
    weights[0, 3] = 1.3
    out = apply_emphasis(hidden, weights)
    expected = hidden[0] * weights[0][:, None]
    expected *= hidden[0].mean() / expected.mean()
    np.testing.assert_allclose(out[0], expected, rtol=1e-5)
    np.testing.assert_array_equal(out[1], hidden[1])
    assert out[0].mean() == pytest.approx(hidden[0].mean(), rel=1e-5)
