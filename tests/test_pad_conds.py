"""A negative prompt and a prompt of different lengths (chunks of 75 tokens), as AUTOMATIC1111 runs them: by default
in UNet calls of their own (its pad_cond_uncond and pad_cond_uncond_v0 off); with "Pad conds", the shorter padded
with the empty prompt's chunks; with "Pad conds v0", the negative prompt padded with its last vector, or cut. In
process, every UNet call recorded (the Triton path: tests/test_sd_pipeline.py's cases; the settings over the API:
tests/test_api.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.infotext import parameters_text
from orchestrator.pipeline import ControlNetUnit, Txt2ImgRequest

pytestmark = pytest.mark.slow

LONG = "a photo of a cat, " * 15  # 90 tokens: two chunks
REQUEST = Txt2ImgRequest(prompt=LONG, negative_prompt="blurry", steps=3, sampler="Euler", cfg_scale=7.5, seed=4,
                         width=64, height=64, batch_size=2)


def _calls(local, request: Txt2ImgRequest):
    """The result, and the inputs of every UNet call."""
    seen: list[dict] = []

    def recording(graph, inputs):
        seen.append({name: value.copy() for name, value in inputs.items()})
        return graph(inputs)

    return local.txt2img(request, unet_call=recording), seen


def _encoded(local, texts: list[str]) -> np.ndarray:
    return local.components.text_encoder.encode(texts, 1)


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_by_default_each_runs_in_a_unet_call_of_its_own(local):
    result, seen = _calls(local, REQUEST)
    negative, prompt = _encoded(local, ["blurry"]), _encoded(local, [LONG])
    assert len(seen) == 2 * 3
    for step, (first, second) in enumerate(zip(seen[::2], seen[1::2])):
        assert np.allclose(first["encoder_hidden_states"], np.repeat(negative, 2, axis=0), atol=1e-6), step
        assert np.allclose(second["encoder_hidden_states"], np.repeat(prompt, 2, axis=0), atol=1e-6), step
        assert np.array_equal(first["sample"], second["sample"])  # the same latents, each half of the guidance
        assert np.array_equal(first["timestep"], second["timestep"])
    assert "pad_conds" not in result.info and "Pad conds" not in parameters_text(result.info)
    # A negative prompt longer than the prompt: the same; s_min_uncond's skipped steps run the prompt's call alone
    _, seen = _calls(local, replace(REQUEST, prompt="a cat", negative_prompt=LONG, s_min_uncond=100.0))
    assert [call["encoder_hidden_states"].shape[1] for call in seen] == [154, 77, 77, 154, 77]
    # One length: one call, as before
    _, seen = _calls(local, replace(REQUEST, prompt="a cat", steps=1))
    assert [len(call["sample"]) for call in seen] == [4]


@pytest.mark.parametrize(("mode", "key"), [("empty_chunks", "Pad conds"), ("last_vector", "Pad conds v0")])
def test_padding_makes_one_call_and_says_so_in_the_infotext(local, mode, key):
    request = replace(REQUEST, pad_conds=mode)
    result, seen = _calls(local, request)
    assert [len(call["sample"]) for call in seen] == [4] * 3
    blurry = _encoded(local, ["blurry"])[0]
    if mode == "empty_chunks":  # as one encoder call pads the shorter prompt
        expected = _encoded(local, ["blurry", LONG])[0]
    else:
        expected = np.concatenate([blurry, np.repeat(blurry[-1:], 77, axis=0)])
    assert np.allclose(seen[0]["encoder_hidden_states"][:2], expected[None], atol=1e-6)
    assert np.allclose(seen[0]["encoder_hidden_states"][2:], _encoded(local, [LONG]), atol=1e-6)
    assert result.info["pad_conds"] == mode and f", {key}: True" in parameters_text(result.info)
    assert _differ(result.images, local.txt2img(REQUEST).images)  # another image than the default's
    # Nothing to pad: the default's image, and no infotext field
    short = replace(REQUEST, prompt="a photo of a cat", steps=2)
    padded = local.txt2img(replace(short, pad_conds=mode))
    assert np.array_equal(padded.images, local.txt2img(short).images) and "pad_conds" not in padded.info
    if mode == "last_vector":  # a longer negative prompt is cut to the prompt's length
        _, seen = _calls(local, replace(request, prompt="a cat", negative_prompt=LONG, steps=1))
        assert np.allclose(seen[0]["encoder_hidden_states"][0], _encoded(local, [LONG])[0, :77], atol=1e-6)


def test_the_hires_pass_and_a_bad_setting(local):
    """The second pass pads too (here only it: its own prompt is the long one)."""
    from orchestrator.pipeline import HiresFix

    request = replace(REQUEST, prompt="a cat", steps=2, batch_size=1, pad_conds="empty_chunks",
                      hires=HiresFix(scale=2, steps=1, denoising_strength=0.5, prompt=LONG))
    result, seen = _calls(local, request)
    assert [call["encoder_hidden_states"].shape[1] for call in seen] == [77, 77, 154]
    assert result.info["pad_conds"] == "empty_chunks"
    _, seen = _calls(local, replace(request, pad_conds="off"))
    assert [call["encoder_hidden_states"].shape[1] for call in seen] == [77, 77, 77, 154]
    with pytest.raises(InputError, match="pad_conds must be one of off, empty_chunks, last_vector, got 'yes'"):
        local.txt2img(replace(REQUEST, pad_conds="yes"))


@pytest.mark.parametrize("mode", [0, 2])
def test_controlnet_units_act_on_each_calls_rows(local, edge_map_png, mode):
    """Balanced: residuals on both calls; ControlNet is more important: none on the negative prompt's call."""
    unit = ControlNetUnit(image=edge_map_png, weight=0.8, control_mode=mode)
    _, seen = _calls(local, replace(REQUEST, steps=1, controlnet=unit))
    assert len(seen) == 2
    negative, prompt = ([value for name, value in call.items() if "residual" in name] for call in seen)
    assert negative and all(value.any() for value in prompt)
    assert all(value.any() for value in negative) if mode == 0 else not any(value.any() for value in negative)


def test_the_prompts_benchmark_runs_every_arm(model_repo, tmp_path):
    from benchmarks.prompts import main

    result = main(["--repository", str(model_repo), "--steps", "2", "--rounds", "1", "--out", str(tmp_path)])
    calls = {name: arm["unet_calls_per_step"] for name, arm in result["arms"].items()}
    assert calls == {"plain": [[2, 77]], "long prompt (default)": [[1, 77], [1, 154]],
                     "long prompt, Pad conds": [[2, 154]], "AND, two parts": [[3, 77]], "prompt editing": [[2, 77]]}
    assert result["arms"]["plain"]["vs_plain"] == 1.0 and "ISA" in (tmp_path / "prompts-tiny.md").read_text()
    assert (tmp_path / "prompts-tiny.png").stat().st_size > 0
