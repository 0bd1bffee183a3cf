"""AUTOMATIC1111's prompt editing, alternation and composable diffusion (AND): the schedules its parser gives, the
parts AND makes, and the pipeline conditioning each denoising step (UNet call) on its step's texts, in process (the
Triton path: tests/test_sd_pipeline.py's cases, and the API's step-batching test).

The expected schedules are AUTOMATIC1111's documented ones (modules/prompt_parser.py's examples, 10 steps), and
what its grammar gives for the hires fix's offsets and for second-order samplers (steps counted twice).
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.prompt_schedule import composable, schedule, text_at
from kiln.prompts import check_prompt_syntax
from orchestrator.pipeline import HiresFix, Txt2ImgRequest


@pytest.mark.parametrize(("prompt", "expected"), [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]),
    ("[fe|]male", [(step, "female" if step % 2 else "male") for step in range(1, 11)]),
    ("[fe|||]male", [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)]),
    ("[cat:dog:5](detailed)", [(5, "cat(detailed)"), (10, "dog(detailed)")]),
    ("([cat:dog:5]:1.2)", [(5, "(cat:1.2)"), (10, "(dog:1.2)")]),  # inside emphasis
    ("[a:b:5 ]", [(5, "a"), (10, "b")]),  # whitespace around the number
    ("[a:b:0] [c:d:-1]", [(10, "b d")]),  # switched before the first step
    ("[a:b:1e1]", [(10, "a")]),  # lark's numbers: 1e1 is the step 10
    ("[a:b:1.0]", [(10, "a")]),  # a point: a fraction, 1.0 x 10
    ("\\[a:b:3\\]", [(10, "\\[a:b:3\\]")]),  # escaped: text (emphasis reads the brackets)
    ("a [b|c] | d", [(10, "a [b|c] | d")]),  # a bar outside [..|..]: AUTOMATIC1111's parser fails, all text
    ("[a:b:0.29]", [(2, "a"), (10, "b")]),  # int(0.29 x 10)
])
def test_schedules_are_automatic1111s(prompt, expected):
    assert schedule(prompt, 10) == expected


def test_fractions_round_down_as_floats_do():
    assert schedule("[a:b:0.29]", 100)[0] == (28, "a")  # 0.29 * 100 = 28.999999999999996, as AUTOMATIC1111 computes


def test_the_hires_pass_counts_on_from_the_first():
    """The second pass's numbers count from the first pass's start: step `when` - steps, or (when - 1) x its steps."""
    assert schedule("a [b:.5] c", 10, 10) == [(10, "a b c")]  # half of the first pass: done before the second
    assert schedule("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert schedule("[a:b:15]", 10, 8) == [(5, "a"), (8, "b")]
    assert schedule("[a:b:5]", 10, 8) == [(8, "b")]


def test_old_timelines_are_automatic1111s_before_1_8():
    """use_old_scheduling: under 1 a fraction, any other number a step (1.0 too); the hires pass runs the first
    pass's timeline again (past its end, the first entry, as AUTOMATIC1111's reconstruct_cond_batch)."""
    assert schedule("[a:b:1.0]", 10, old=True) == [(1, "a"), (10, "b")]
    assert schedule("[a:b:1.0]", 10) == [(10, "a")]
    assert schedule("[a:b:0.5]", 10, old=True) == schedule("[a:b:0.5]", 10) == [(5, "a"), (10, "b")]
    assert schedule("[a:b:0.5]", 10, 8, old=True) == [(5, "a"), (10, "b")]
    assert schedule("[a:b:0.5]", 10, 8) == [(8, "b")]
    assert schedule("[a:b:15]", 10, 8, old=True) == [(10, "a")]


def test_each_step_runs_the_first_entry_that_ends_at_or_after_it():
    entries = schedule("[a:b:3]", 10)  # [(3, a), (10, b)]
    assert [entries[text_at(entries, step)][1] for step in range(12)] == ["a"] * 4 + ["b"] * 7 + ["a"]
    alternating = schedule("[a|b]", 4)  # from step 0: AUTOMATIC1111's counter starts at 0, its entries at 1
    assert [alternating[text_at(alternating, step)][1] for step in range(4)] == ["a", "a", "b", "a"]


@pytest.mark.parametrize(("text", "names"), [
    ("a [cat:dog]", "[cat:dog] is not valid prompt editing or alternation (prompt editing is [from:to:when]"),
    ("a [cat:dog:big]", "[cat:dog:big] is not valid"),
    ("a [cat:dog|fox]", "alternation is [a|b|...]"),
    ("a [cat|dog] | fox", "the prompt does not parse"),
    ("[a:[b:c:3]]", "[a:…] is not valid"),  # an outer bracket that holds no valid construct (… : the edit in it)
])
def test_editing_that_does_not_parse_is_refused_by_name(text, names):
    with pytest.raises(InputError, match=re.escape(names)):
        check_prompt_syntax(text)
    check_prompt_syntax(text.replace("[", "\\[").replace("]", "\\]").replace("|", ""))  # escaped: text


def test_valid_editing_passes_the_check():
    for text in ("a [cat:dog:5]", "a [cat|dog|fox]", "[cat:[dog|fox]:0.5] (detail:1.2)", "a | b", "a [unbalanced"):
        check_prompt_syntax(text)


@pytest.mark.parametrize(("prompt", "parts"), [
    ("a cat", [("a cat", 1.0)]),
    ("a cat ", [("a cat ", 1.0)]),  # one part without a weight: the prompt untouched
    ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),  # AUTOMATIC1111 keeps a part's leading space
    ("a cat:1.5", [("a cat", 1.5)]),  # a weight without AND: that part's guidance x 1.5, as AUTOMATIC1111
    ("a (cat:1.5)", [("a (cat:1.5)", 1.0)]),  # emphasis, not a weight
    ("a cat AND", [("a cat", 1.0), ("", 1.0)]),
    ("ANDROID AND droid:-.5", [("ANDROID", 1.0), (" droid", -0.5)]),
    ("[a cat:a dog:3] AND snow", [("[a cat:a dog:3]", 1.0), (" snow", 1.0)]),  # each part has its own schedule
])
def test_and_splits_the_prompt_into_weighted_parts(prompt, parts):
    assert composable(prompt) == parts


def test_and_outside_a_prompt_is_refused():
    check_prompt_syntax("a cat AND a dog", "prompt", parts=True)
    check_prompt_syntax("[a AND b:c]", "prompt", parts=True)  # split first, as AUTOMATIC1111: "[a " and " b:c]", text
    with pytest.raises(InputError, match="negative_prompt: AND .composable diffusion. is the prompt's"):
        check_prompt_syntax("blurry AND dark", "negative_prompt")
    with pytest.raises(InputError, match="AND"):  # one part is what the text encoder takes
        check_prompt_syntax("a cat AND a dog")


# -- the pipeline --------------------------------------------------------------------------------------------------
def _contexts(local, request: Txt2ImgRequest, info: bool = False) -> tuple:
    """The images (or with `info`, the run's info), and the encoder_hidden_states of every UNet call."""
    seen: list[np.ndarray] = []

    def recording(graph, inputs):
        seen.append(inputs["encoder_hidden_states"].copy())
        return graph(inputs)

    result = local.txt2img(request, unet_call=recording)
    return result.info if info else result.images, seen


def _encoded(local, request: Txt2ImgRequest, texts: list[str]) -> np.ndarray:
    """`texts` encoded in one text-encoder call (no editing; all padded with empty chunks to the longest)."""
    return local.components.text_encoder.encode(texts, request.clip_skip)


@pytest.mark.slow
def test_each_unet_call_is_conditioned_on_its_steps_text(local):
    request = Txt2ImgRequest(prompt="a photo of [a cat:a dog:2]", negative_prompt="[blurry|dark]", steps=4,
                             sampler="Euler", seed=3, width=64, height=64, batch_size=2)
    images, seen = _contexts(local, request)
    texts = {(negative, prompt): _encoded(local, request, [negative, prompt])
             for negative in ("blurry", "dark") for prompt in ("a photo of a cat", "a photo of a dog")}
    # steps 0..3: the prompt is "a cat" up to step 2; the negative alternates from step 0 as blurry, blurry, dark, ...
    expected = [("blurry", "a photo of a cat"), ("blurry", "a photo of a cat"), ("dark", "a photo of a cat"),
                ("blurry", "a photo of a dog")]
    for step, (context, pair) in enumerate(zip(seen, expected)):
        assert np.array_equal(context, np.repeat(texts[pair], 2, axis=0)), step  # rows: negative x 2, prompt x 2
    plain = local.txt2img(replace(request, prompt="a photo of a cat", negative_prompt="blurry")).images
    assert np.abs(images.astype(int) - plain.astype(int)).max() > 0
    # An edit past the last step is its first text all through; one before the first step, its second
    assert np.array_equal(local.txt2img(replace(request, prompt="a photo of [a cat:a dog:9]",
                                                negative_prompt="blurry")).images, plain)
    assert np.array_equal(local.txt2img(replace(request, prompt="a photo of [a dog:a cat:0]",
                                                negative_prompt="[blurry|blurry]")).images, plain)


@pytest.mark.slow
def test_second_order_samplers_count_each_model_call(local):
    """Heun calls the UNet twice a step (5 calls for 3 steps); AUTOMATIC1111 schedules its edits over 6."""
    request = Txt2ImgRequest(prompt="[a cat:a dog:0.5]", negative_prompt="", steps=3, sampler="Heun", seed=1,
                             width=64, height=64)
    _, seen = _contexts(local, request)
    cat, dog = _encoded(local, request, ["", "a cat"]), _encoded(local, request, ["", "a dog"])
    assert len(seen) == 5
    assert [np.array_equal(c, cat) for c in seen] == [True] * 4 + [False] and np.array_equal(seen[4], dog)


@pytest.mark.slow
@pytest.mark.parametrize("negative", ["blurry", ""])  # SD 1.x's empty negative prompt: its encoding, never zeros
def test_texts_of_different_lengths_are_padded_as_automatic1111_pads_them(local, negative):
    """A step's own texts only: AND's parts padded by repeating their last vector (reconstruct_multicond_batch); with
    "Pad conds", the negative prompt padded with empty chunks to the prompt's length (pad_cond_uncond, as one encoder
    call pads them; without it, tests/test_pad_conds.py: two UNet calls)."""
    long = "a photo of a cat, " * 15  # 90 tokens: two chunks
    request = Txt2ImgRequest(prompt=f"[a dog:{long}:1]", negative_prompt=negative, steps=3, sampler="Euler", seed=2,
                             width=64, height=64, pad_conds="empty_chunks")
    _, seen = _contexts(local, request)
    assert [context.shape[1] for context in seen] == [77, 77, 154]  # each step its own length
    assert np.allclose(seen[0], _encoded(local, request, [negative, "a dog"]), atol=1e-6)
    assert np.allclose(seen[2], _encoded(local, request, [negative, long]), atol=1e-6)  # one call: empty chunks
    _, seen = _contexts(local, replace(request, prompt=f"a dog AND {long}"))
    dog = _encoded(local, request, ["a dog"])[0]
    assert np.allclose(seen[0][1], np.concatenate([dog, np.repeat(dog[-1:], 77, axis=0)]), atol=1e-6)
    assert np.allclose(seen[0][[0, 2]], _encoded(local, request, [negative, " " + long]), atol=1e-6)


@pytest.mark.slow
def test_the_hires_pass_edits_by_the_whole_runs_steps(local):
    """[a:b:1.5] switches half way through the second pass; the first pass runs `a` alone."""
    request = Txt2ImgRequest(prompt="[a cat:a dog:1.5]", negative_prompt="", steps=2, sampler="Euler", seed=1,
                             width=64, height=64, hires=HiresFix(scale=2, steps=4, denoising_strength=0.5))
    _, seen = _contexts(local, request)
    cat, dog = _encoded(local, request, ["", "a cat"]), _encoded(local, request, ["", "a dog"])
    assert len(seen) == 2 + 4
    assert [("cat" if np.array_equal(c, cat) else "dog" if np.array_equal(c, dog) else "?") for c in seen] == \
        ["cat"] * 2 + ["cat"] * 3 + ["dog"]  # second pass: 4 steps, when (1.5 - 1) x 4 = 2: steps 0, 1, 2 are cat
    # Old timelines: [a:b:0.5] over the first pass's 2 steps, in both passes: cat to step 1, then dog; the second
    # pass's step 3 is past that timeline's end, and runs its first entry again (AUTOMATIC1111's fallback)
    old = replace(request, prompt="[a cat:a dog:0.5]", use_old_scheduling=True)
    info, seen = _contexts(local, old, info=True)
    assert [("cat" if np.array_equal(c, cat) else "dog" if np.array_equal(c, dog) else "?") for c in seen] == \
        ["cat"] * 2 + ["cat", "cat", "dog", "cat"]
    assert info["old_timelines"] is True  # AUTOMATIC1111's infotext names it where a timeline differs
    same = replace(old, prompt="[a cat:a dog:1]", hires=None)  # a step number, one pass: either timeline
    assert "old_timelines" not in _contexts(local, same, info=True)[0]



@pytest.mark.slow
def test_and_guides_each_part_by_its_weight(local):
    """Rows: the negative prompt, then each part; each part's guidance x its weight (AUTOMATIC1111's
    combine_denoised). Two halves of one prompt give its image; s_min_uncond's skipped steps run the parts alone."""
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler", seed=5,
                             width=64, height=64, batch_size=2)
    plain, _ = _contexts(local, request)
    halves, seen = _contexts(local, replace(request, prompt="a photo of a cat :0.5 AND a photo of a cat:0.5"))
    assert np.abs(halves.astype(int) - plain.astype(int)).max() <= 1
    rows = _encoded(local, request, ["blurry", "a photo of a cat", " a dog"])
    mixed, seen = _contexts(local, replace(request, prompt="a photo of a cat AND a dog :0.7"))
    assert all(np.array_equal(context, np.repeat(rows, 2, axis=0)) for context in seen)  # (1 + 2 parts) x batch 2
    assert np.abs(mixed.astype(int) - plain.astype(int)).max() > 0
    assert np.array_equal(local.txt2img(replace(request, prompt="a photo of a cat :1")).images, plain)
    sizes: list[int] = []
    local.txt2img(replace(request, prompt="a cat AND a dog", s_min_uncond=100.0),
                  unet_call=lambda graph, inputs: sizes.append(len(inputs["sample"])) or graph(inputs))
    assert sizes == [6, 4, 6, 4]  # odd steps: the two parts' rows alone
    with pytest.raises(InputError, match="prompt: AND .composable diffusion. weighs each part's guidance; it needs"):
        local.txt2img(replace(request, prompt="a cat AND a dog", cfg_scale=1.0))
    with pytest.raises(InputError, match="prompt: it ends in :9, which AUTOMATIC1111 reads as the prompt's weight"):
        local.txt2img(replace(request, prompt="a wide photo, 16:9", cfg_scale=1.0))
    local.txt2img(replace(request, prompt="a wide photo, 16:9,", cfg_scale=1.0, steps=1))  # a comma: text
