"""LoRA, end to end: AUTOMATIC1111's tags, the folder, kohya's and diffusers' files, the build's weight maps, merged
sessions against diffusers' load_lora_weights, the same images through Triton, the step batcher never mixing sets,
and every refusal naming its cause.

The LoRA files are the session's (conftest.lora_dir, `kiln weights lora --tiny`'s): detail (text encoder and UNet,
rank 4, alpha 2, alias detail-v1) and sub/style (UNet only, rank 2).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from build.sd.lora import random_lora, write_lora
from kiln.errors import ConfigError, InputError, WeightsError
from kiln.lora import (
    LoraLayer,
    LoraLibrary,
    LoraUse,
    decode_spec,
    encode_spec,
    read_lora,
    split_lora_tags,
)
from kiln.prompts import check_prompt_syntax
from orchestrator.pipeline import ControlNetUnit, HiresFix, Pipeline, Txt2ImgRequest

slow = pytest.mark.slow
BASE = dict(negative_prompt="blurry", steps=4, sampler="Euler a", cfg_scale=7.5, seed=21, width=64, height=64)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# -- tags, specs, files: no models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, uses", [
    ("a cat <lora:detail>", (LoraUse("detail", 1.0, 1.0),)),
    ("a cat <lora:detail:0.5>", (LoraUse("detail", 0.5, 0.5),)),
    ("<lora:detail:0.5:0.2> a cat", (LoraUse("detail", 0.5, 0.2),)),
    ("a cat <lora:detail:te=0.3:unet=0.9>", (LoraUse("detail", 0.3, 0.9),)),
    ("a cat <lora:detail:0.4:unet=1.2>", (LoraUse("detail", 0.4, 1.2),)),
    ("a <lyco:style:0.7> cat <lora:detail:-1>", (LoraUse("style", 0.7, 0.7), LoraUse("detail", -1.0, -1.0))),
])
def test_tags_read_as_automatic1111_reads_them(prompt, uses):
    text, found = split_lora_tags(prompt)
    assert found == uses
    assert "<" not in text and "cat" in text


@pytest.mark.parametrize("tag, message", [
    ("<lora::1>", "names no LoRA"), ("<lora:detail:x>", "'x' is not a multiplier"),
    ("<lora:detail:nan>", "is not a multiplier"), ("<lora:detail:1:dyn=4>", "dyn"),
    ("<lora:detail:1:1:1:1>", "dyn"), ("<lora:detail:foo=1>", "unknown argument 'foo'"),
])
def test_bad_tags_are_named(tag, message):
    with pytest.raises(InputError, match=message):
        split_lora_tags(f"a cat {tag}")


def test_other_tags_and_the_negative_prompts_tags_are_refused_never_text():
    text, uses = split_lora_tags("a cat <hypernet:x:1>")
    assert uses == () and "<hypernet:x:1>" in text
    with pytest.raises(InputError, match="LoRA tags .* only, in the prompt"):
        check_prompt_syntax(text)
    with pytest.raises(InputError, match="negative_prompt: <lora:detail:1> .* the prompt only"):
        check_prompt_syntax("blurry <lora:detail:1>", "negative_prompt")


def test_specs_sum_repeats_drop_zeros_and_refuse_paths_outside_the_folder():
    assert encode_spec([("b.safetensors", 0.4), ("a.safetensors", 1.0), ("b.safetensors", 0.4)]) == \
        '[["a.safetensors",1.0],["b.safetensors",0.8]]'
    assert encode_spec([("a.safetensors", 0.5), ("a.safetensors", -0.5)]) == ""
    assert decode_spec('[["sub/a.safetensors",0.5]]') == [("sub/a.safetensors", 0.5)]
    for bad in ('[["../a.safetensors",1]]', '[["/etc/a.safetensors",1]]', '[["a.ckpt",1]]', "nonsense", "[[1]]"):
        with pytest.raises(InputError):
            decode_spec(bad)


def test_kohya_and_peft_layouts_read_to_the_same_difference(tmp_path):
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    kohya = write_lora(tmp_path / "k.safetensors", {
        f"lora_unet_{module.replace('.', '_')}.lora_down.weight": down,
        f"lora_unet_{module.replace('.', '_')}.lora_up.weight": up,
        f"lora_unet_{module.replace('.', '_')}.alpha": np.array(2.0, np.float32)})
    peft = write_lora(tmp_path / "p.safetensors", {f"unet.{module}.lora_A.weight": down * 0.5,
                                                    f"unet.{module}.lora_B.weight": up})
    key = module.replace(".", "_")
    expected = up @ down * 0.5  # alpha / rank
    for path in (kohya, peft):
        layers = read_lora(path, "unet")
        assert list(layers) == [key] and read_lora(path, "text_encoder") == {}
        np.testing.assert_allclose(layers[key].delta((64, 32)), expected, rtol=1e-6)
    conv = LoraLayer(up=up.reshape(64, 4, 1, 1), down=down.reshape(4, 32, 1, 1), alpha=4.0)
    np.testing.assert_allclose(conv.delta((64, 32, 1, 1)), (up @ down).reshape(64, 32, 1, 1), rtol=1e-6)
    with pytest.raises(WeightsError, match="shape"):
        conv.delta((32, 32))


def test_loha_and_lokr_make_the_differences_peft_makes_scaled_as_automatic1111_scales_them(tmp_path):
    """LyCORIS's layers against PEFT's own LoHa and LoKr functions (peft.tuners.loha/lokr make_weight, make_kron and
    their Tucker forms), with AUTOMATIC1111's scale: alpha / rank where a factor is a product (a LoKr's rank is
    w2_b's), 1 where a LoKr's factors are both whole, whatever its alpha; and a LoRA's Tucker mid summed by hand.
    Linear and convolution weights, read from kohya-named files."""
    import torch
    from peft.tuners.loha.layer import make_weight, make_weight_cp
    from peft.tuners.lokr.layer import make_kron
    from peft.tuners.lokr.layer import make_weight_cp as lokr_cp

    rng = np.random.default_rng(1)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def t(array):
        return torch.from_numpy(array)

    w1a, w1b, w2a, w2b = normal(64, 4), normal(4, 32 * 9), normal(64, 4), normal(4, 32 * 9)
    k1, k2a, k2b, k2 = normal(4, 8), normal(16, 2), normal(2, 4), normal(16, 4, 3, 3)
    files = {
        "loha": ({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": 2.0}, (64, 32, 3, 3),
                 make_weight(t(w1a), t(w1b), t(w2a), t(w2b), torch.tensor(2.0 / 4))),
        "lokr": ({"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": 3.0}, (64, 32),
                 make_kron(t(k1), t(k2a @ k2b), 3.0 / 2)),
        "lokr_conv_whole": ({"lokr_w1": k1, "lokr_w2": k2, "alpha": 3.0}, (64, 32, 3, 3), make_kron(t(k1), t(k2))),
    }
    # Tucker factors (convolutions'): LoHa's t1/t2 between w_a (rank, out) and w_b (rank, in), LoKr's t2, LoRA's mid
    t1, t2 = normal(3, 3, 3, 3), normal(3, 3, 3, 3)
    a1, b1, a2, b2 = normal(3, 64), normal(3, 32), normal(3, 64), normal(3, 32)
    files["loha_tucker"] = ({"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2, "hada_w2_a": a2,
                             "hada_w2_b": b2, "alpha": 1.5}, (64, 32, 3, 3),
                            make_weight_cp(t(t1), t(a1), t(b1), t(t2), t(a2), t(b2), torch.tensor(0.5)))
    c2a, c2b = normal(3, 16), normal(3, 4)
    files["lokr_tucker"] = ({"lokr_w1": k1, "lokr_t2": t2, "lokr_w2_a": c2a, "lokr_w2_b": c2b, "alpha": 6.0},
                            (64, 32, 3, 3), make_kron(t(k1), lokr_cp(t(t2), t(c2a), t(c2b)), 2.0))
    up, down, mid = normal(64, 3, 1, 1), normal(3, 32, 1, 1), normal(3, 3, 3, 3)
    by_hand = np.zeros((64, 32, 3, 3), np.float32)  # sum over the ranks of up's column x mid x down's row
    for n in range(3):
        for m in range(3):
            by_hand += up[:, n, 0, 0, None, None, None] * mid[n, m] * down[m, :, 0, 0, None, None]
    files["lora_mid"] = ({"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": 1.5},
                         (64, 32, 3, 3), t(by_hand * 0.5))
    for name, (parts, shape, expected) in files.items():
        path = write_lora(tmp_path / f"{name}.safetensors", {f"lora_unet_mid_block_x.{part}": np.asarray(v, np.float32)
                                                              for part, v in parts.items()})
        delta = read_lora(path, "unet")["mid_block_x"].delta(shape)
        np.testing.assert_allclose(delta, expected.numpy().reshape(shape), rtol=1e-5, atol=1e-5, err_msg=name)


def _decomposed(updown, weight, magnitude):
    """AUTOMATIC1111's apply_weight_decompose (extensions-builtin/Lora/network.py), written out in torch."""
    import torch

    updown, weight, magnitude = (torch.from_numpy(np.asarray(a, np.float32)) for a in (updown, weight, magnitude))
    merged = updown + weight
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).reshape(
        merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
    return (merged * (magnitude / norm) - weight).numpy()


def test_dora_scales_decompose_as_automatic1111_does(tmp_path):
    """A DoRA scale on a LoRA (a linear and a 3x3 convolution) and on a full difference: the weight plus the scaled
    difference, each input column rescaled to its magnitude, less the weight; per-output magnitudes are refused."""
    rng = np.random.default_rng(3)
    cases = {"lin": (64, 32), "conv": (16, 8, 3, 3), "full": (24, 24)}
    tensors, expected = {}, {}
    for name, shape in cases.items():
        weight = rng.standard_normal(shape).astype(np.float32)
        magnitude = rng.uniform(0.5, 2.0, (1, shape[1], *[1] * (len(shape) - 2))).astype(np.float32)
        if name == "full":
            parts = {"diff": rng.standard_normal(shape).astype(np.float32) * 0.1}
            updown = parts["diff"]
        else:
            down = rng.standard_normal((4, *shape[1:])).astype(np.float32)
            up = rng.standard_normal((shape[0], 4, *[1] * (len(shape) - 2))).astype(np.float32)
            parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": np.array(2.0, np.float32)}
            updown = (up.reshape(shape[0], 4) @ down.reshape(4, -1)).reshape(shape) * 0.5  # alpha / rank
        tensors |= {f"lora_unet_{name}.{part}": v for part, v in (parts | {"dora_scale": magnitude}).items()}
        expected[name] = (weight, _decomposed(updown, weight, magnitude))
    layers = read_lora(write_lora(tmp_path / "dora.safetensors", tensors), "unet")
    for name, (weight, reference) in expected.items():
        np.testing.assert_allclose(layers[name].delta(cases[name], weight), reference, rtol=1e-4, atol=1e-5)
        assert np.abs(reference - layers[name].delta(cases[name], weight * 1.5)).max() > 0.1  # it reads the weight
    with pytest.raises(WeightsError, match="depends on the weight"):
        layers["lin"].delta(cases["lin"])
    per_output = replace(layers["lin"], dora_scale=np.ones((64, 1), np.float32))
    with pytest.raises(WeightsError, match="one per output channel"):
        per_output.delta((64, 32), expected["lin"][0])


def test_a_set_with_dora_keeps_the_tags_order_and_refuses_its_repeats(tmp_path):
    """AUTOMATIC1111 applies the files in the tags' order, each to the weight as the ones before left it: a set with
    DoRA layers keeps that order (others are sorted, their differences adding up in any order); a DoRA file tagged
    twice would be applied to its own result, which no summed multiplier gives."""
    assert encode_spec([("b.safetensors", 1), ("a.safetensors", 0.5)], ordered=True) == \
        '[["b.safetensors",1.0],["a.safetensors",0.5]]'
    layer = {"lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32),
             "lora_unet_x.lora_up.weight": np.ones((4, 2), np.float32)}
    write_lora(tmp_path / "plain.safetensors", layer)
    write_lora(tmp_path / "dora.safetensors", layer | {"lora_unet_x.dora_scale": np.ones((1, 4), np.float32)})
    library = LoraLibrary(tmp_path)
    uses = split_lora_tags("<lora:plain:0.7> <lora:dora:0.8>")[1]
    assert decode_spec(library.resolve(uses).spec("unet")) == [("plain.safetensors", 0.7), ("dora.safetensors", 0.8)]
    assert decode_spec(library.resolve(uses[::-1]).spec("unet"))[0][0] == "dora.safetensors"
    without = split_lora_tags("<lora:plain:0.7> <lora:plain:0.1>")[1]  # no DoRA: summed (linear in the multiplier)
    assert decode_spec(library.resolve(without).spec("unet")) == [("plain.safetensors", pytest.approx(0.8))]
    with pytest.raises(InputError, match="DoRA layers tagged twice"):
        library.resolve(split_lora_tags("<lora:dora:0.5> <lora:plain> <lora:dora:0.5>")[1])


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_x.hada_w1_a": 1}, "not one whole layer"), ({"lora_unet_x.hada_t1": 1}, "not one whole layer"),
    ({"lora_unet_x.lokr_w1": 1, "lora_unet_x.lokr_w2_a": 1}, "not one whole layer"),
    ({"lora_unet_x.lokr_w1": 1, "lora_unet_x.lokr_w2": 1, "lora_unet_x.lokr_t2": 1}, "not one whole layer"),
    ({"lora_unet_x.lokr_w1": 1, "lora_unet_x.lokr_w2": 1, "lora_unet_x.hada_w1_a": 1}, "not one whole layer"),
    ({"lora_unet_x.lokr_w1": 1, "lora_unet_x.lokr_w3": 1}, "a LoKr part"), ({"lora_unet_x.oft_blocks": 1}, "no layer"),
    ({"lora_unet_x.dora_scale": 1}, "not one whole layer"),  # a DoRA scale alone: no difference to decompose
    ({"lora_unet_x.lora_down.weight": 1}, "not one whole layer"),
    ({"lora_unet_x.diff_b": 1}, "a bias difference"), ({"model.weight": 1}, "no layer kiln reads"),
])
def test_other_algorithms_and_broken_files_are_refused_by_name(tmp_path, keys, message):
    path = write_lora(tmp_path / "odd.safetensors", {k: np.ones((2, 2), np.float32) for k in keys})
    with pytest.raises(WeightsError, match=message):
        read_lora(path)
    library = LoraLibrary(tmp_path)
    assert library.listing() == []
    with pytest.raises(InputError, match=message):
        library.find("odd")


def test_the_folder_lists_in_automatic1111s_shape_and_finds_by_name_or_alias(lora_dir, tmp_path):
    library = LoraLibrary(lora_dir)
    listing = {entry["name"]: entry for entry in library.listing()}
    assert set(listing) == {"detail", "style"}
    assert listing["detail"]["alias"] == "detail-v1"
    assert listing["detail"]["metadata"] == {"ss_output_name": "detail-v1"}
    assert listing["style"]["path"] == str(lora_dir / "sub" / "style.safetensors")
    assert library.find("detail-v1").name == "detail"
    assert library.find("style").components == ("unet",)
    assert library.find("detail").components == ("text_encoder", "unet")
    with pytest.raises(InputError, match=r"<lora:nope>: no such LoRA in .*; available: detail, style"):
        library.resolve([LoraUse("nope")])
    with pytest.raises(InputError, match=r"no LoRA folder"):
        LoraLibrary(None).find("detail")
    twice = tmp_path / "twice"
    for where in ("a", "b"):
        write_lora(twice / where / "same.safetensors", random_lora("tiny", text_encoder=False))
    with pytest.raises(InputError, match="2 files have that name"):
        LoraLibrary(twice).find("same")
    resolved = library.resolve([LoraUse("style", 0.3, 0.7), LoraUse("detail", 0.5, 0.25)])
    assert resolved.names == ("style", "detail")
    assert json.loads(resolved.spec("text_encoder")) == [["detail.safetensors", 0.5]]  # style has no text encoder
    assert json.loads(resolved.spec("unet_control")) == [["detail.safetensors", 0.25], ["sub/style.safetensors", 0.7]]


# -- the build's maps ------------------------------------------------------------------------------------------------
def test_the_build_maps_every_linear_and_conv_weight_of_the_text_encoder_and_unets(model_repo, local):
    for model in ("sd_text_encoder", "sd_unet", "sd_unet_control"):
        content = json.loads((model_repo / model / "1" / "model.onnx.lora.json").read_text())
        assert content["unmatched"] == [] and len(content["targets"]) > 20, model
    unet = json.loads((model_repo / "sd_unet" / "1" / "model.onnx.lora.json").read_text())["targets"]
    assert local.contract.lora_layers == len({target["constant"] for target in unet.values()})
    # each UNet layer by both names: diffusers' and the original layout's (kohya's SDXL files, LyCORIS)
    assert len(unet) == 2 * local.contract.lora_layers
    assert unet["input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        unet["down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    every = {k[len("lora_unet_"):-len(".alpha")] for k in random_lora("tiny") if k.startswith("lora_unet_")
             and k.endswith(".alpha")}
    assert every <= set(unet)  # every layer kohya trains by default has its constant
    assert unet["down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]["transposed"]  # MatMul's (in, out)


# -- in process: diffusers' parity, what changes and what does not --------------------------------------------------
@slow
def test_parity_with_diffusers_load_lora_weights(local, sd_checkpoint, lora_dir):
    """diffusers (PEFT) with the same file and scales: one LoRA at 0.8, and two with the text encoder's and the UNet's
    multipliers apart. Measured: 0/255 both."""
    from tests.conftest import diffusers_image, diffusers_pipeline

    pipe = diffusers_pipeline(sd_checkpoint)
    scheduler_config = dict(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir), weight_name="detail.safetensors", adapter_name="detail")
    pipe.load_lora_weights(str(lora_dir / "sub"), weight_name="style.safetensors", adapter_name="style")

    def with_adapters(adapters, weights):
        pipe.set_adapters(adapters, adapter_weights=weights)
        return diffusers_image(pipe, scheduler_config, BASE | {"prompt": "a photo of a cat"})

    one = local.txt2img(Txt2ImgRequest(prompt="a photo of a cat <lora:detail:0.8>", **BASE)).images
    assert _max_diff(one, with_adapters(["detail"], [0.8])) <= 2
    two = local.txt2img(Txt2ImgRequest(prompt="a photo of <lora:detail:0.3:0.7>a cat<lora:style:1.5>", **BASE)).images
    assert _max_diff(two, with_adapters(["detail", "style"], [{"text_encoder": 0.3, "unet": 0.7}, 1.5])) <= 2
    plain = local.txt2img(Txt2ImgRequest(prompt="a photo of a cat", **BASE)).images
    assert _max_diff(one, plain) > 10 and _max_diff(two, one) > 10  # the LoRAs act (measured: 43 and 60 apart)


def _lycoris_files(pipe, folder):
    """A LoHa and a LoKr for the tiny SD, in kohya's names, each on a UNet attention projection, a UNet 3x3
    convolution and a text-encoder projection (LoKr: every way its factors come, whole or products); and each
    module's difference at multiplier 1 made by PEFT's functions with AUTOMATIC1111's scales (the test's reference)."""
    import torch
    from peft.tuners.loha.layer import make_weight
    from peft.tuners.lokr.layer import make_kron

    rng = np.random.default_rng(5)
    modules = {"unet": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"),
               "te": ("encoder.layers.0.self_attn.q_proj",)}
    loha, lokr, expected = {}, {}, {"loha": {}, "lokr": {}}
    for prefix, names in modules.items():
        model = pipe.unet if prefix == "unet" else pipe.text_encoder
        for name in names:
            weight = model.get_submodule(name).weight
            out, fan_in, kernel = weight.shape[0], int(np.prod(weight.shape[1:])), tuple(weight.shape[2:])
            key = f"lora_{prefix}_{'text_model_' if prefix == 'te' else ''}{name.replace('.', '_')}"  # kohya's
            size = float(weight.std()) ** 0.25 * 0.8  # a LoHa's difference (of 4 factors) about as wide as the weight

            def normal(*shape, std=size):
                return (rng.standard_normal(shape) * std).astype(np.float32)

            a = {"hada_w1_a": normal(out, 2), "hada_w1_b": normal(2, fan_in), "hada_w2_a": normal(out, 2),
                 "hada_w2_b": normal(2, fan_in)}
            loha |= {f"{key}.{part}": value for part, value in a.items()} | {f"{key}.alpha": np.float32(1.0)}
            expected["loha"][(prefix, name)] = make_weight(*(torch.from_numpy(a[f"hada_{p}"]) for p in (
                "w1_a", "w1_b", "w2_a", "w2_b")), torch.tensor(0.5)).reshape(weight.shape)
            w1 = normal(2, 2)
            if kernel:  # a convolution: both factors whole, w2 with its kernel; its alpha is not applied
                k = {"lokr_w1": w1, "lokr_w2": normal(out // 2, weight.shape[1] // 2, *kernel), "alpha": np.float32(4)}
                delta = make_kron(torch.from_numpy(w1), torch.from_numpy(k["lokr_w2"]))
            elif prefix == "unet":  # w1 whole, w2 a product of rank 3: alpha / 3
                k = {"lokr_w1": w1, "lokr_w2_a": normal(out // 2, 3), "lokr_w2_b": normal(3, fan_in // 2),
                     "alpha": np.float32(1.5)}
                delta = make_kron(torch.from_numpy(w1), torch.from_numpy(k["lokr_w2_a"] @ k["lokr_w2_b"]), 0.5)
            else:  # w1 a product of rank 1, w2 whole: alpha / 1
                k = {"lokr_w1_a": normal(2, 1), "lokr_w1_b": normal(1, 2), "lokr_w2": normal(out // 2, fan_in // 2),
                     "alpha": np.float32(0.5)}
                delta = make_kron(torch.from_numpy(k["lokr_w1_a"] @ k["lokr_w1_b"]), torch.from_numpy(k["lokr_w2"]),
                                  0.5)
            lokr |= {f"{key}.{part}": value for part, value in k.items()}
            expected["lokr"][(prefix, name)] = delta.reshape(weight.shape)
    write_lora(folder / "loha.safetensors", loha)
    write_lora(folder / "lokr.safetensors", lokr)
    return expected


@slow
def test_loha_and_lokr_files_match_diffusers_with_their_differences_merged(model_repo, sd_checkpoint, tmp_path):
    """LyCORIS's LoHa and LoKr through kiln's LoRA path (the build's weight maps, the merged sessions) against
    diffusers' pipeline with the same differences (PEFT's functions, AUTOMATIC1111's scales) added to its weights."""
    import torch

    from tests.conftest import diffusers_image, diffusers_pipeline

    pipe = diffusers_pipeline(sd_checkpoint)
    scheduler_config = dict(pipe.scheduler.config)
    expected = _lycoris_files(pipe, tmp_path)
    kiln = Pipeline.from_repository(model_repo, loras=tmp_path)
    prompt = "a photo of a cat"
    ours = kiln.txt2img(Txt2ImgRequest(prompt=f"{prompt} <lora:loha:0.8> <lora:lokr:1.2>", **BASE)).images
    with torch.no_grad():
        for name, multiplier in (("loha", 0.8), ("lokr", 1.2)):
            for (prefix, module), delta in expected[name].items():
                model = pipe.unet if prefix == "unet" else pipe.text_encoder
                model.get_submodule(module).weight += delta * multiplier
    reference = diffusers_image(pipe, scheduler_config, BASE | {"prompt": prompt})
    plain = kiln.txt2img(Txt2ImgRequest(prompt=prompt, **BASE)).images
    assert _max_diff(ours, reference) <= 2, _max_diff(ours, reference)
    assert _max_diff(ours, plain) > 10, _max_diff(ours, plain)  # they act (measured: 1 and 57 apart)


def _rank_two(rng, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rank-2 LoRA's up and down for `weight` (alpha-less: scale 1) and their difference, about as wide as it."""
    out, kernel = weight.shape[0], weight.shape[2:]
    down = (rng.standard_normal((2, *weight.shape[1:])) * float(weight.std())).astype(np.float32)
    up = rng.standard_normal((out, 2, *[1] * len(kernel))).astype(np.float32)
    return up, down, (up.reshape(out, -1) @ down.reshape(2, -1)).reshape(weight.shape)


@slow
def test_a_dora_file_after_a_lora_matches_diffusers_with_automatic1111s_decomposition(model_repo, sd_checkpoint,
                                                                                     tmp_path):
    """A LoRA, then a DoRA file on the same modules (a UNet attention projection, a UNet 3x3 convolution, a text
    encoder projection), through kiln's merged sessions, against diffusers' pipeline whose weights take the LoRA's
    difference and then AUTOMATIC1111's decomposition of the DoRA file's against the weight the LoRA left (tag order:
    "dora" sorts first, so a set applied in name order would fail)."""
    import torch

    from tests.conftest import diffusers_image, diffusers_pipeline

    pipe = diffusers_pipeline(sd_checkpoint)
    scheduler_config = dict(pipe.scheduler.config)
    rng = np.random.default_rng(9)
    modules = {"unet": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"),
               "te": ("encoder.layers.0.self_attn.q_proj",)}
    plain, dora, changes = {}, {}, []
    for prefix, names in modules.items():
        model = pipe.unet if prefix == "unet" else pipe.text_encoder
        for name in names:
            weight = model.get_submodule(name).weight.detach().numpy()
            kernel = weight.shape[2:]
            key = f"lora_{prefix}_{'text_model_' if prefix == 'te' else ''}{name.replace('.', '_')}"
            up, down, first = _rank_two(rng, weight)
            plain |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}
            up, down, second = _rank_two(rng, weight)
            after = weight + 0.7 * first + second  # magnitudes about the columns' norms there, 0.8x to 1.25x
            norms = np.linalg.norm(after.swapaxes(0, 1).reshape(weight.shape[1], -1), axis=1)
            magnitude = (norms * rng.uniform(0.8, 1.25, norms.shape)).reshape(1, -1, *[1] * len(kernel))
            dora |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
                     f"{key}.dora_scale": magnitude.astype(np.float32)}
            changes.append((model.get_submodule(name), first, second, magnitude))
    write_lora(tmp_path / "plain.safetensors", plain)
    write_lora(tmp_path / "dora.safetensors", dora)
    kiln = Pipeline.from_repository(model_repo, loras=tmp_path)
    prompt = "a photo of a cat"
    ours = kiln.txt2img(Txt2ImgRequest(prompt=f"{prompt} <lora:plain:0.7> <lora:dora:0.8>", **BASE)).images
    with torch.no_grad():
        for module, first, second, magnitude in changes:
            module.weight += torch.from_numpy(0.7 * first)
            current = module.weight.detach().numpy().copy()
            module.weight += torch.from_numpy(0.8 * _decomposed(second, current, magnitude))
    reference = diffusers_image(pipe, scheduler_config, BASE | {"prompt": prompt})
    only_plain = kiln.txt2img(Txt2ImgRequest(prompt=f"{prompt} <lora:plain:0.7>", **BASE)).images
    assert _max_diff(ours, reference) <= 2, _max_diff(ours, reference)  # measured: 0 (in name order: 6)
    assert _max_diff(ours, only_plain) > 10, _max_diff(ours, only_plain)  # the DoRA file acts (measured: 49)


@slow
def test_what_changes_the_image_and_what_does_not(local):
    def image(prompt: str, **extra) -> np.ndarray:
        return local.txt2img(Txt2ImgRequest(prompt=prompt, **(BASE | extra))).images

    plain = image("a photo of a cat")
    assert np.array_equal(image("a photo of a cat <lora:detail:0>"), plain)  # multiplier 0: the base models
    assert np.array_equal(image("a photo of a cat <lora:detail:0:0>"), plain)
    assert np.array_equal(image("a photo of a cat <lora:detail:0.4> <lora:detail:0.4>"),
                          image("a photo of a cat <lora:detail:0.8>"))  # repeats add up, as AUTOMATIC1111's
    assert np.array_equal(image("a photo of a cat <lora:detail-v1:0.8>"), image("<lora:detail:0.8>a photo of a cat"))
    te_only, unet_only = image("a photo of a cat <lora:detail:1:0>"), image("a photo of a cat <lora:detail:0:1>")
    assert _max_diff(te_only, plain) > 0 and _max_diff(unet_only, plain) > 0 and _max_diff(te_only, unet_only) > 0


@slow
def test_refusals_name_their_cause(local, model_repo, tmp_path):
    with pytest.raises(InputError, match=r"<lora:nope>: no such LoRA .* available: detail, style"):
        local.txt2img(Txt2ImgRequest(prompt="a cat <lora:nope:1>", **BASE))
    with pytest.raises(InputError, match="negative_prompt: <lora:detail:1>"):
        local.txt2img(Txt2ImgRequest(prompt="a cat", **(BASE | {"negative_prompt": "<lora:detail:1>"})))
    with pytest.raises(InputError, match="hr_prompt: <lora:nope:1>|<lora:nope>: no such LoRA"):
        local.txt2img(Txt2ImgRequest(prompt="a cat", hires=HiresFix(prompt="a dog <lora:nope:1>"), **BASE))
    before = Pipeline(replace(local.components, contract=replace(local.contract, lora_layers=0)))
    with pytest.raises(InputError, match=r"<lora:detail>: this build's models take no LoRA .* rebuild"):
        before.txt2img(Txt2ImgRequest(prompt="a cat <lora:detail:1>", **BASE))
    other = tmp_path / "loras"  # a LoRA for another model: modules this UNet lacks
    tensors = random_lora("tiny", text_encoder=False)
    tensors |= {"lora_unet_input_blocks_1_1_proj_in." + part: tensors.pop(f"lora_unet_down_blocks_1_attentions_0_"
                                                                          f"proj_in.{part}")
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    write_lora(other / "ldm.safetensors", tensors)
    with pytest.raises(InputError, match=r"LoRA ldm: 1 of its 72 unet layers name modules this model does not have .*"
                                         r"input_blocks_1_1_proj_in"):
        Pipeline.from_repository(model_repo, loras=other).txt2img(
            Txt2ImgRequest(prompt="a cat <lora:ldm:1>", **BASE))


def test_held_sets_are_reused_and_dropped_past_the_budget(model_repo, lora_dir):
    from kiln.runtime import Session, SessionOptions
    from kiln.runtime.lora import LoraSessions

    base = Session(SessionOptions("onnxruntime", model_repo / "sd_unet" / "1" / "model.onnx"))
    detail, style = '[["detail.safetensors",1.0]]', '[["sub/style.safetensors",1.0]]'
    held = LoraSessions(base, lora_dir, budget_bytes=1 << 30)
    assert held.session("") is base
    first = held.session(detail)
    assert held.session(detail) is first and held.built == 1  # held: no second merge
    held.session(style)
    assert held.built == 2 and held.held_bytes > 0
    tight = LoraSessions(base, lora_dir, budget_bytes=1)  # room for the newest set only
    tight.session(detail), tight.session(style), tight.session(detail)
    assert tight.built == 3 and len(tight._sets) == 1
    with pytest.raises(InputError, match="not in"):
        held.session('[["gone.safetensors",1.0]]')


def test_weights_in_external_data_are_replaced_as_the_file_loads_at_every_optimization_level(model_repo, lora_dir,
                                                                                           tmp_path, monkeypatch):
    """A UNet past 2 GB keeps its weights in model.onnx.data: with KILN_LORA_ORT_LEVEL=all a LoRA session replaces
    them as the file loads (before ONNX Runtime's layout transforms read them) and runs at every optimization level,
    giving what the session over the inline file gives at the extended level (the default for both)."""
    import onnx
    import onnxruntime as ort

    from kiln.runtime import Session, SessionOptions
    from kiln.runtime.lora import LoraSessions, external_initializers, map_path

    inline = model_repo / "sd_unet" / "1" / "model.onnx"
    external = tmp_path / "model.onnx"  # the tiny UNet saved as the build saves a large one
    onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    map_path(external).write_text(map_path(inline).read_text())
    assert external_initializers(external) and not external_initializers(inline)
    spec = '[["detail.safetensors",0.8]]'

    def opened() -> dict:
        return {kind: LoraSessions(Session(SessionOptions("onnxruntime", path)), lora_dir)
                for kind, path in (("inline", inline), ("external", external))}

    def levels(sessions: dict) -> dict:
        return {kind: held.session(spec)._ort.get_session_options().graph_optimization_level
                for kind, held in sessions.items()}

    extended, every = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert levels(opened()) == {"inline": extended, "external": extended}  # the default
    monkeypatch.setenv("KILN_LORA_ORT_LEVEL", "all")
    sessions = opened()
    assert levels(sessions) == {"inline": extended, "external": every}
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([500.0, 20.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    got, expected = (sessions[kind].session(spec).run(feed)["noise_pred"] for kind in ("external", "inline"))
    base = sessions["inline"].base.run(feed)["noise_pred"]
    assert np.abs(got - expected).max() < 1e-4 < np.abs(base - expected).max()
    monkeypatch.setenv("KILN_LORA_ORT_LEVEL", "fastest")
    with pytest.raises(ConfigError, match="KILN_LORA_ORT_LEVEL='fastest': extended or all"):
        LoraSessions(sessions["external"].base, lora_dir).session(spec)


# -- the step batcher: rows of different sets never share a UNet batch --------------------------------------------
@slow
def test_concurrent_sets_batch_apart_and_match_their_solo_images(local):
    from orchestrator.batching import StepBatcher

    batches: list[tuple[str, int]] = []

    class Recording(StepBatcher):
        def _execute(self, graph, inputs, rows=None):
            batches.append((graph.key, len(inputs["sample"])))
            return super()._execute(graph, inputs, rows)

    prompts = ["a cat <lora:detail:0.8>", "a dog <lora:detail:0.8>", "a cat <lora:style:1>", "a cat"]
    solo = [local.txt2img(Txt2ImgRequest(prompt=p, **BASE)).images for p in prompts]
    batcher = Recording(max_rows=16, window_s=5.0)
    barrier = threading.Barrier(len(prompts))

    def run(prompt):
        with batcher.participant():
            barrier.wait()
            return local.generate(Txt2ImgRequest(prompt=prompt, **BASE), unet_call=batcher).images

    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(run, prompts))
    finally:
        batcher.close()
    for mine, alone in zip(together, solo):
        assert np.array_equal(mine, alone)
    keys = {key for key, _ in batches}
    assert len(keys) == 3  # plain, detail, style: three graphs
    assert max(rows for key, rows in batches if "detail" in key) == 4  # the two detail requests' rows, merged


# -- through Triton: the same images, and the models' own refusals ---------------------------------------------------
@pytest.fixture(scope="module")
def served(triton, lora_dir) -> Pipeline:
    from orchestrator.pipeline.components.triton import triton_components

    return Pipeline(triton_components(triton.grpc_url, loras=LoraLibrary(lora_dir)))


@slow
def test_triton_gives_the_in_process_images(served, local, sd_checkpoint):
    edge = (sd_checkpoint / "controlnet").exists()
    requests = [Txt2ImgRequest(prompt="a cat <lora:detail:0.8> <lora:style:0.5>", **(BASE | {"batch_size": 2})),
                Txt2ImgRequest(prompt="a cat <lora:detail:0.6>", hires=HiresFix(scale=1.5, steps=2,
                                                                               prompt="a dog <lora:style:1>"),
                               **BASE)]
    if edge:  # ControlNet -> UNet in one ensemble call, the LoRA going to its UNet step
        from PIL import Image

        from tests.conftest import encode

        control = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        requests.append(Txt2ImgRequest(prompt="a cat <lora:detail:1>", controlnet=ControlNetUnit(image=control),
                                       **BASE))
    for request in requests:
        assert np.array_equal(served.txt2img(request).images, local.txt2img(request).images), request.prompt


@slow
def test_the_models_refuse_bad_sets_as_the_requests_fault(triton, lora_dir):
    from kiln.triton_client import TritonClient

    client = TritonClient(triton.grpc_url, "grpc")
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
              "timestep": np.full((2, 1), 500.0, np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    try:
        mixed = np.array([[b'[["detail.safetensors",1.0]]'], [b""]], dtype=object)
        with pytest.raises(InputError, match="rows of one request name different LoRA sets"):
            client.infer("sd_unet", inputs | {"lora": mixed}, ["noise_pred"])
        outside = np.array([[b'[["../detail.safetensors",1.0]]']] * 2, dtype=object)
        with pytest.raises(InputError, match="not a .safetensors file's path under the LoRA folder"):
            client.infer("sd_unet", inputs | {"lora": outside}, ["noise_pred"])
        plain = client.infer("sd_unet", inputs, ["noise_pred"])["noise_pred"]
        empty = client.infer("sd_unet", inputs | {"lora": np.array([[b""]] * 2, dtype=object)}, ["noise_pred"])
        assert np.array_equal(plain, empty["noise_pred"])  # "" is the base model
    finally:
        client.close()


# -- the routes, over real HTTP --------------------------------------------------------------------------------------
@slow
def test_list_refresh_and_use_over_http(triton, lora_dir, tmp_path):
    import shutil

    from kiln.infotext import parse_infotext
    from kiln.triton_server import free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    mine = tmp_path / "loras"
    shutil.copytree(lora_dir, mine)
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), loras_dir=mine))
    body = {"prompt": "a photo of a cat <lora:detail:0.8>", "negative_prompt": "blurry", "steps": 3, "seed": 4,
            "width": 64, "height": 64, "sampler_name": "Euler a"}
    try:
        with live.client() as client:
            listing = client.get("/sdapi/v1/loras").json()
            assert [(e["name"], e["alias"], e["path"]) for e in listing] == [
                ("detail", "detail-v1", str(mine / "detail.safetensors")),
                ("style", "style", str(mine / "sub" / "style.safetensors"))]
            styled = client.post("/sdapi/v1/txt2img", json=body)
            assert styled.status_code == 200, styled.text
            info = json.loads(styled.json()["info"])
            hashes = info["extra_generation_params"]["Lora hashes"]
            assert hashes.startswith("detail: ") and len(hashes) == len("detail: ") + 12
            assert parse_infotext(info["infotexts"][0])["Lora hashes"] == hashes
            assert info["prompt"] == body["prompt"]  # the tags stay in the prompt AUTOMATIC1111 reports
            plain = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a photo of a cat"})
            assert plain.json()["images"][0] != styled.json()["images"][0]
            unknown = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a cat <lora:ink:1>"})
            assert unknown.status_code == 422 and "available: detail, style" in unknown.text, unknown.text
            write_lora(mine / "ink.safetensors", random_lora("tiny", seed=5, text_encoder=False))  # the folder changed
            assert "ink" in [e["name"] for e in client.get("/sdapi/v1/loras").json()]
            # the models read their own folder (the session Triton's KILN_LORAS is lora_dir): one the service lists
            # but they lack is a 422 saying so
            missing = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a cat <lora:ink:1>"})
            assert missing.status_code == 422 and f"ink.safetensors is not in {lora_dir}" in missing.text, missing.text
            (mine / "sub" / "style.safetensors").unlink()  # inside a sub-folder: the top folder does not change
            assert client.post("/sdapi/v1/refresh-loras").json() is None
            assert "style" not in [e["name"] for e in client.get("/sdapi/v1/loras").json()]
    finally:
        live.stop()


@slow
def test_openvino_takes_the_same_sets_within_its_precision(plain_checkpoint, plain_repo, lora_dir, tmp_path):
    """The OpenVINO fp16 UNet (its constants replaced before it compiles) against ONNX Runtime fp32's LoRA session,
    which equals diffusers exactly: within fp16's tolerance, and far closer to it than to the UNet without the LoRA."""
    from build.convert import SD_VARIANTS, derive
    from build.parity import compare
    from build.sd.export import export_modules
    from build.sd.lora import write_lora_map
    from build.sd.weights import load_sd
    from kiln.runtime import Session, SessionOptions
    from kiln.runtime.lora import LoraSessions

    kind = SD_VARIANTS["openvino-fp16"]
    target = tmp_path / kind.artifact
    derive(kind, plain_repo / "sd_unet" / "1" / "model.onnx", target)
    written = write_lora_map(export_modules(load_sd(plain_checkpoint))["unet"], "unet", "openvino", target)
    assert written["unmatched"] == 0 and written["layers"] > 100
    spec = '[["detail.safetensors",0.8]]'
    openvino = LoraSessions(Session(SessionOptions("openvino", target)), lora_dir)
    reference = LoraSessions(Session(SessionOptions("onnxruntime", plain_repo / "sd_unet" / "1" / "model.onnx")),
                             lora_dir)
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([500.0, 20.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    got = openvino.session(spec).run(feed)["noise_pred"]
    expected = reference.session(spec).run(feed)["noise_pred"]
    base = reference.base.run(feed)["noise_pred"]
    assert compare(expected, got).cosine > 0.999  # fp16 weights
    assert np.abs(got - expected).max() * 10 < np.abs(base - expected).max()
