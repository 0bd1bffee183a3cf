"""sd-webui-controlnet's control modes (orchestrator.pipeline.control): My prompt is more important (soft
injection), ControlNet is more important (soft, and no control on the unconditional rows), and the soft injection a
canny unit gets in the hires fix's second pass.

"ControlNet is more important" is diffusers' guess mode with the extension's scales: diffusers runs the ControlNet on
the prompt's rows only and gives the unconditional rows zero residuals, and scales residual i by
torch.logspace(-1, 0, 13)[i] = 10^((i - 12) / 12); the extension by 0.825^(12 - i) (0.8254 against 0.825 per level).
The reference run makes diffusers' logspace the extension's scales, so the two implementations are compared exactly.
The other modes are checked on the tensors the UNet receives against the ControlNet's own residuals (recorded from
the real runs, not stand-ins).
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.errors import InputError
from orchestrator.pipeline import ControlNetUnit, HiresFix, Txt2ImgRequest, make_scheduler

pytestmark = pytest.mark.slow


def _request(edge_map_png, mode: int, **changes) -> Txt2ImgRequest:
    return Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler", cfg_scale=7.5,
                          seed=5, width=64, height=64, batch_size=2,
                          controlnet=ControlNetUnit(image=edge_map_png, weight=0.8, control_mode=mode)) \
        if not changes else replace(_request(edge_map_png, mode), **changes)


def _recorded(local, request: Txt2ImgRequest, monkeypatch) -> tuple[np.ndarray, list[dict], list[dict]]:
    """The images, each ControlNet call's residuals as it returned them, and the residuals each UNet call took."""
    control = local.components.controlnets[local.contract.controlnet(None).name]
    raw: list[dict] = []
    original = type(control).residuals

    def recording(self, inputs):
        out = original(self, inputs)
        raw.append({name: value.copy() for name, value in out.items()})
        return out

    monkeypatch.setattr(type(control), "residuals", recording)  # records the real residuals; changes nothing
    taken: list[dict] = []

    def unet(graph, inputs):
        taken.append({name: value.copy() for name, value in inputs.items() if "residual" in name})
        return graph(inputs)

    images = local.txt2img(request, unet_call=unet).images
    monkeypatch.undo()
    return images, raw, taken


def _factor(name: str, count: int) -> float:
    """The extension's soft-injection scale of a residual: 0.825^(12 - its position), the middle one last of
    `count` (13 for SD 1.x: x 1; the tiny test UNet has 7)."""
    position = count - 1 if name == "mid_residual" else int(name.rsplit("_", 1)[1])
    return 0.825 ** (12 - position)


def test_my_prompt_is_more_important_weakens_the_high_resolution_residuals(local, edge_map_png, monkeypatch):
    balanced, raw, taken = _recorded(local, _request(edge_map_png, 0), monkeypatch)
    assert all(np.array_equal(r[name], t[name]) for r, t in zip(raw, taken) for name in r)  # Balanced: as returned
    prompt, raw, taken = _recorded(local, _request(edge_map_png, 1), monkeypatch)
    assert len(raw) == len(taken) == 4 and len(raw[0]) == 7
    for returned, took in zip(raw, taken):
        for name, value in returned.items():
            assert np.allclose(took[name], value * _factor(name, 7), rtol=1e-6, atol=0), name
    assert _factor("down_residual_0", 13) == pytest.approx(0.0994, abs=1e-4) and _factor("mid_residual", 13) == 1
    assert np.abs(prompt.astype(int) - balanced.astype(int)).max() > 2


def test_controlnet_is_more_important_as_diffusers_guess_mode(local, sd_checkpoint, edge_map_png, monkeypatch):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    request = _request(edge_map_png, 2, batch_size=1, steps=6)
    ours, raw, taken = _recorded(local, request, monkeypatch)
    assert not any(value[:1].any() for step in raw for value in step.values())  # the unconditional row: none
    assert all(np.allclose(t[name][1:], r[name][1:] * _factor(name, len(r)), rtol=1e-6, atol=0)
               for r, t in zip(raw, taken) for name in r)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    control_pipe = StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=ControlNetModel.from_pretrained(str(sd_checkpoint / "controlnet")))
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    logspace = torch.logspace
    # the reference: diffusers' guess mode with the extension's scales (its logspace is only ever this call there):
    # 0.825^(12 - i) for the i-th of its residuals, the middle one last
    monkeypatch.setattr(torch, "logspace", lambda start, end, steps, **kw: torch.tensor(
        [0.825 ** (12 - i) for i in range(steps)], dtype=torch.float32, device=kw.get("device")))
    expected = control_pipe("a photo of a cat", image=Image.open(io.BytesIO(edge_map_png)), num_inference_steps=6,
                            guidance_scale=7.5, negative_prompt="blurry", controlnet_conditioning_scale=0.8,
                            guess_mode=True, height=64, width=64, output_type="np",
                            generator=torch.Generator().manual_seed(5)).images
    monkeypatch.setattr(torch, "logspace", logspace)
    expected = (expected * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 2
    balanced = local.txt2img(_request(edge_map_png, 0, batch_size=1, steps=6)).images
    assert np.abs(balanced.astype(int) - ours.astype(int)).max() > 2


def test_a_canny_unit_soft_injects_in_the_hires_pass(local, init_image_png, monkeypatch):
    """The extension forces soft injection on canny (and mlsd) units in the second pass; the first pass is Balanced."""
    unit = ControlNetUnit(image=init_image_png, module="canny", weight=0.8)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=2, sampler="Euler", seed=3,
                             width=64, height=64, controlnet=unit,
                             hires=HiresFix(scale=2, steps=2, denoising_strength=0.5))
    _, raw, taken = _recorded(local, request, monkeypatch)
    assert len(raw) == len(taken) == 4
    for step, (returned, took) in enumerate(zip(raw, taken)):
        for name, value in returned.items():
            factor = _factor(name, len(returned)) if step >= 2 else 1
            assert np.allclose(took[name], value * factor, rtol=1e-6, atol=0), step


def test_a_bad_control_mode_is_refused(local, edge_map_png):
    with pytest.raises(InputError, match="control_mode must be 0 .Balanced., 1 .My prompt is more important. or 2"):
        local.txt2img(_request(edge_map_png, 3))


WEIGHTS = tuple(0.3 + 0.1 * i for i in range(13))  # one per residual of SD 1.x (the tiny UNet's 7 take the first)


def _position(name: str, count: int) -> int:
    return count - 1 if name == "mid_residual" else int(name.rsplit("_", 1)[1])


@pytest.mark.parametrize("mode", [0, 2])
def test_advanced_weighting_scales_each_residual_in_place_of_weight_and_softening(local, edge_map_png, monkeypatch,
                                                                                 mode):
    """sd-webui-controlnet's advanced_weighting: residual i x its i-th scale (the weight and mode 2's softening not
    applied); mode 2 still leaves the unconditional rows without control. The ControlNet ran at scale 1: its first
    step's residuals are a weight-1 unit's."""
    request = _request(edge_map_png, mode)
    weighted = replace(request, controlnet=replace(request.controlnet, advanced_weighting=WEIGHTS))
    _, raw, taken = _recorded(local, weighted, monkeypatch)
    _, plain, _ = _recorded(local, replace(request, controlnet=replace(request.controlnet, weight=1.0)), monkeypatch)
    assert all(np.array_equal(raw[0][name], plain[0][name]) for name in raw[0])
    for returned, took in zip(raw, taken):
        for name, value in returned.items():
            expected = value * np.float32(WEIGHTS[_position(name, len(returned))])
            assert np.allclose(took[name], expected, rtol=1e-6, atol=0), name
            if mode == 2:
                assert not took[name][:2].any()  # (batch 2: the two unconditional rows first)


def test_advanced_weighting_of_the_soft_scales_is_my_prompt_is_more_important(local, edge_map_png):
    soft_scales = tuple(0.825 ** (12 - i) for i in range(7)) + (1.0,) * 6  # (the tiny UNet's 7: its middle one 7th)
    request = _request(edge_map_png, 0, controlnet=ControlNetUnit(image=edge_map_png, advanced_weighting=soft_scales))
    softened = _request(edge_map_png, 1, controlnet=ControlNetUnit(image=edge_map_png, control_mode=1))
    assert np.array_equal(local.txt2img(request).images, local.txt2img(softened).images)


def _region_png(left: int = 255, right: int = 0, size=(64, 64)) -> bytes:
    mask = np.full((size[1], size[0]), right, np.uint8)
    mask[:, : size[0] // 2] = left
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_effective_region_mask_keeps_the_residuals_where_it_is_white(local, edge_map_png, monkeypatch):
    """Every residual x the mask stretched to its size (torch's bilinear interpolate, as the extension's
    apply_effective_region_mask): a mask white on its left half keeps the left half of each residual and zeroes the
    right; all black is no control at all, all white the unit unmasked."""
    import torch.nn.functional as F

    request = _request(edge_map_png, 1)  # (soft: residuals weighed here with or without a mask)
    half = _region_png()
    _, raw, taken = _recorded(local, replace(request, controlnet=replace(request.controlnet, region_mask=half)),
                              monkeypatch)
    mask = torch.from_numpy(np.asarray(Image.open(io.BytesIO(half)), np.float32) / 255)[None, None]
    for returned, took in zip(raw, taken):
        for name, value in returned.items():
            softened = value * np.float32(_factor(name, len(returned)))
            stretched = F.interpolate(mask, size=value.shape[-2:], mode="bilinear").numpy()[0, 0]
            assert np.allclose(took[name], softened * stretched, rtol=1e-6, atol=0), name
            width = value.shape[-1]
            if width >= 2:
                assert np.array_equal(took[name][..., : width // 2], softened[..., : width // 2])
                assert not took[name][..., width // 2:].any()
    black = replace(request.controlnet, region_mask=_region_png(left=0))
    no_control = replace(request, controlnet=None)
    assert np.array_equal(local.txt2img(replace(request, controlnet=black)).images, local.txt2img(no_control).images)
    white = replace(request.controlnet, region_mask=_region_png(right=255, size=(1, 1)))  # (x 1 everywhere)
    assert np.array_equal(local.txt2img(replace(request, controlnet=white)).images, local.txt2img(request).images)


@pytest.mark.parametrize(("changes", "message"), [
    ({"advanced_weighting": (1.0,) * 5}, "advanced_weighting must be a list of at least 13 numbers"),
    ({"advanced_weighting": (1.0,) * 12 + (float("nan"),)}, "advanced_weighting must be a list"),
    ({"advanced_weighting": (3.0,) * 13}, r"each scale must be in \[0, 2\]"),
])
def test_bad_advanced_weighting_is_refused(local, edge_map_png, changes, message):
    request = _request(edge_map_png, 0)
    with pytest.raises(InputError, match=message):
        local.txt2img(replace(request, controlnet=replace(request.controlnet, **changes)))
