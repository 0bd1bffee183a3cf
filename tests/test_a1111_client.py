"""An unmodified AUTOMATIC1111 client library against kiln's API: webuiapi (mix1009's sdwebuiapi, what Python users
of AUTOMATIC1111's API install), with every default it sends: txt2img, img2img, the hires fix, LoRA and embeddings,
and the listings it reads. Whatever it sends is honoured or refused by name, never ignored (the field walk holds
each field to that; here the library's own payloads go through as they are).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kiln.embeddings import write_embedding
from kiln.triton_server import free_port
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings

webuiapi = pytest.importorskip("webuiapi")  # pinned in requirements.txt: make test installs it
pytestmark = pytest.mark.slow
SMALL = dict(width=64, height=64, steps=3, seed=5, negative_prompt="blurry")


@pytest.fixture(scope="module")
def client(triton, lora_dir, tmp_path_factory):
    embeddings = tmp_path_factory.mktemp("embeddings")
    write_embedding(embeddings / "my-style.safetensors", np.random.default_rng(1).normal(0, 0.05, (2, 32)))
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), max_queue=8, workers=4,
                                  loras_dir=lora_dir, embeddings_dir=embeddings))
    try:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=live.settings.port, sampler="Euler a", steps=3)
    finally:
        live.stop()


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image.convert("RGB"))


def test_txt2img_with_its_defaults_lora_embeddings_and_the_hires_fix(client):
    plain = client.txt2img(prompt="a photo of a cat", **SMALL)
    assert plain.image.size == (64, 64) and plain.info["seed"] == 5 and plain.info["sampler_name"] == "Euler a"
    assert np.array_equal(_pixels(client.txt2img(prompt="a photo of a (cat:1.0)", **SMALL)), _pixels(plain))
    lora = client.txt2img(prompt="a photo of a cat <lora:detail:0.8>", **SMALL)
    assert not np.array_equal(_pixels(lora), _pixels(plain))
    assert lora.info["extra_generation_params"]["Lora hashes"].startswith("detail: ")
    styled = client.txt2img(prompt="a photo of a cat in the style of my-style", **SMALL)
    assert not np.array_equal(_pixels(styled), _pixels(plain))
    hires = client.txt2img(prompt="a photo of a cat <lora:style:1>", enable_hr=True, hr_scale=1.5,
                           hr_second_pass_steps=2, denoising_strength=0.5, **SMALL)
    assert hires.image.size == (96, 96)
    assert client.txt2img(prompt="a cat", override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL).image.size \
        == (64, 64)
    with pytest.raises(RuntimeError, match="no such LoRA"):  # webuiapi raises on a non-200 answer
        client.txt2img(prompt="a cat <lora:nope:1>", **SMALL)
    seamless = client.txt2img(prompt="a photo of a cat", tiling=True, **SMALL)
    assert not np.array_equal(_pixels(seamless), _pixels(plain)) and "Tiling: True" in seamless.info["infotexts"][0]
    with pytest.raises(RuntimeError, match="restore_faces"):  # what kiln cannot honour is a 422 naming it
        client.txt2img(prompt="a cat", restore_faces=True, **SMALL)


def test_img2img_with_its_defaults(client):
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = client.img2img(images=[start], prompt="a painting <lora:detail:0.5>", denoising_strength=0.5, **SMALL)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = client.img2img(images=[start], mask_image=mask, prompt="a dog", denoising_strength=0.75,
                               inpainting_fill=1, **SMALL)
    kept = np.asarray(inpainted.image.convert("RGB"))[:8, :8].astype(int)
    assert np.abs(kept - np.asarray(start)[:8, :8].astype(int)).max() <= 2  # outside the mask: the original


def test_the_listings_it_reads(client):
    assert [lora["name"] for lora in client.get_loras()] == ["detail", "style"]
    assert "my-style" in client.get_embeddings()["loaded"]
    assert client.util_get_model_names() and "Euler a" in client.util_get_sampler_names()
    assert client.get_options()["CLIP_stop_at_last_layers"] == 1
