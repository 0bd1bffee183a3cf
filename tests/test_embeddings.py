"""AUTOMATIC1111's textual-inversion embeddings, end to end: the files, the names found in prompts by their token
ids, the text encoder's per-request vectors (bit-identical without them), parity with diffusers'
load_textual_inversion, Triton against the in-process loop, the routes, and what is refused by name.

The embeddings folder (`kiln weights embedding` writes its files): my-style (3 vectors, the tiny encoder's 32 wide),
wide-style (48 wide: skipped, stays text) and old-style.pt (pickled: refused, never loaded).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from build.sd.weights import clip_tokenizer
from kiln.embeddings import EmbeddingLibrary, mentioned, read_embedding, write_embedding
from kiln.errors import InputError, WeightsError
from kiln.prompts import EmbeddingLookup, embedding_tensors, embeddings_from_tensors, token_vector_id, tokenize_prompt
from orchestrator.pipeline import Pipeline, Txt2ImgRequest

slow = pytest.mark.slow
HIDDEN = 32  # the tiny text encoder's


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def _vectors(n: int, hidden: int = HIDDEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, (n, hidden)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from kiln.cli import main

    folder = tmp_path_factory.mktemp("embeddings")
    assert main(["weights", "embedding", "--tiny", str(folder / "my-style.safetensors"), "--vectors", "3"]) == 0
    write_embedding(folder / "wide-style.safetensors", _vectors(2, hidden=48))
    (folder / "old-style.pt").write_bytes(b"\x80\x04pickled")
    return folder


# -- files ---------------------------------------------------------------------------------------------------------
def test_the_layouts_users_have_are_read(tmp_path):
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    vectors = _vectors(2)
    save_file({"emb_params": vectors}, str(tmp_path / "a1111.safetensors"))
    save_file({"string_to_param.*": vectors}, str(tmp_path / "converted.safetensors"))
    save_file({"<cat-toy>": vectors[0]}, str(tmp_path / "diffusers.safetensors"))  # diffusers' one token, (hidden,)
    save_file({"emb_params": vectors.astype(np.float16)}, str(tmp_path / "half.safetensors"))
    save_torch({"emb_params": torch.from_numpy(vectors).bfloat16()}, str(tmp_path / "bf16.safetensors"),
               metadata={"step": "500", "sd_checkpoint_name": "v1-5"})
    assert np.array_equal(read_embedding(tmp_path / "a1111.safetensors").vectors, vectors)
    assert np.array_equal(read_embedding(tmp_path / "converted.safetensors").vectors, vectors)
    diffusers = read_embedding(tmp_path / "diffusers.safetensors")
    assert diffusers.name == "diffusers" and np.array_equal(diffusers.vectors, vectors[:1])
    assert np.allclose(read_embedding(tmp_path / "half.safetensors").vectors, vectors, atol=1e-3)
    bf16 = read_embedding(tmp_path / "bf16.safetensors")
    assert np.array_equal(bf16.vectors, torch.from_numpy(vectors).bfloat16().float().numpy())
    assert bf16.describe() == {"step": 500, "sd_checkpoint": None, "sd_checkpoint_name": "v1-5", "shape": HIDDEN,
                               "vectors": 2}

    save_file({"clip_l": vectors, "clip_g": _vectors(2, 1280)}, str(tmp_path / "xl.safetensors"))
    xl = read_embedding(tmp_path / "xl.safetensors")  # SDXL's: both encoders' vectors side by side, as its encoding
    assert xl.vectors.shape == (2, HIDDEN + 1280) and np.array_equal(xl.vectors[:, :HIDDEN], vectors)
    save_file({"clip_l": vectors, "clip_g": _vectors(3, 1280)}, str(tmp_path / "xl.safetensors"))
    save_file({"a": vectors, "b": vectors}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": np.full((1, 4), np.nan, np.float32)}, str(tmp_path / "nan.safetensors"))
    (tmp_path / "style.pt").write_bytes(b"\x80\x04anything")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, message in [("xl.safetensors", r"clip_l \(2, \d+\) and clip_g \(3, 1280\)"),
                          ("two.safetensors", "holds 2 tensors"),
                          ("nan.safetensors", "finite"), ("style.pt", "style.pt is a pickled file, which kiln never "
                                                                      "loads .*convert it to .safetensors"),
                          ("junk.safetensors", "junk.safetensors is not a readable .safetensors file")]:
        with pytest.raises(WeightsError, match=message):
            read_embedding(tmp_path / name)


def test_the_command_writes_automatic1111s_layout(folder):
    from safetensors.numpy import load_file

    assert list(load_file(str(folder / "my-style.safetensors"))) == ["emb_params"]
    embedding = read_embedding(folder / "my-style.safetensors")
    assert embedding.name == "my-style" and embedding.vectors.shape == (3, HIDDEN)


def test_the_library_lists_skips_refuses_and_reads_again(folder, tmp_path):
    library = EmbeddingLibrary(folder)
    listing = library.listing(HIDDEN)
    assert listing == {"loaded": {"my-style": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                               "shape": HIDDEN, "vectors": 3}},
                       "skipped": {"wide-style": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                  "shape": 48, "vectors": 2}}}
    assert library.listing(0)["loaded"] == {}  # a build before embeddings takes none
    selected = library.select(["a photo in the style of my-style", "wide-style"], HIDDEN)
    assert list(selected) == ["my-style"]  # wide-style is another encoder's: it stays text, as in AUTOMATIC1111
    with pytest.raises(InputError, match=r"embedding 'old-style': old-style.pt is a pickled file"):
        library.select(["a cat, (old-style:1.2)"], HIDDEN)
    with pytest.raises(InputError, match=r"names the textual-inversion embedding 'my-style', which this build's text "
                                         r"encoder cannot take \(built before embeddings\); rebuild"):
        library.select(["my-style"], 0)
    assert library.select(["a cat"], 0) == {} and EmbeddingLibrary(None).select(["my-style"], HIDDEN) == {}

    copy = tmp_path / "copy"
    copy.mkdir()
    write_embedding(copy / "my-style.safetensors", _vectors(3))
    library = EmbeddingLibrary(copy)
    assert library.listing(HIDDEN)["loaded"]["my-style"]["vectors"] == 3
    stamp = copy.stat().st_mtime_ns
    write_embedding(copy / "my-style.safetensors", _vectors(5))  # replaced in place: the folder looks unchanged
    os.utime(copy, ns=(stamp, stamp))
    assert library.listing(HIDDEN)["loaded"]["my-style"]["vectors"] == 3
    library.refresh()
    assert library.listing(HIDDEN)["loaded"]["my-style"]["vectors"] == 5
    write_embedding(copy / "sub" / "other.safetensors", _vectors(1))  # a new file (in a sub-folder, as A1111 reads)
    os.utime(copy)
    assert set(library.listing(HIDDEN)["loaded"]) == {"my-style", "other"}


def test_names_are_found_as_words():
    names = ["my-style", "cat", "dog", "style", "my style"]
    assert mentioned(["a (my-style:1.2) cats"], names) == ["my-style", "style"]
    assert mentioned(["MY - Style BREAK a dog"], names) == ["my-style", "dog", "style"]  # as CLIP splits words
    assert mentioned(["my\nstyle, cat"], names) == ["cat", "style", "my style"]
    assert mentioned(["(unbalanced:x"], names) == []


# -- tokenization ----------------------------------------------------------------------------------------------------
def test_a_name_becomes_its_vectors_positions(tokenizer):
    vectors = _vectors(3)
    lookup = EmbeddingLookup(tokenizer, {"my-style": vectors, "unused": _vectors(2, seed=3)}, HIDDEN)
    tokens = tokenize_prompt(tokenizer, "a photo in the style of my-style, blue", embeddings=lookup)
    assert np.array_equal(lookup.vectors, vectors)  # the vectors found: what the text encoder gets
    plain = tokenize_prompt(tokenizer, "a photo in the style of my-style, blue")
    assert tokens.ids[0, 7:10].tolist() == [token_vector_id(0), token_vector_id(1), token_vector_id(2)] == [-1, -2, -3]
    assert tokens.ids[0, 10:12].tolist() == plain.ids[0, 10:12].tolist()  # ", blue": the name was 3 tokens too
    assert tokens.token_count == plain.token_count == 11
    weighted = tokenize_prompt(tokenizer, "a photo of [(my-style:1.5)], blue", embeddings=lookup)
    assert np.allclose(weighted.weights[0, 4:7], 1.5 / 1.1) and weighted.weights[0, 8] == 1  # emphasis per vector
    for text in ("a photo in the style of my-styles", "my style", "mystyle"):  # not the name's tokens: text
        assert (tokenize_prompt(tokenizer, text, embeddings=lookup).ids >= 0).all(), text
    assert np.array_equal(EmbeddingLookup(tokenizer, {}, HIDDEN).vectors, np.zeros((1, HIDDEN), np.float32))


def test_an_embedding_is_never_split_across_chunks_and_the_longest_name_wins(tokenizer):
    lookup = EmbeddingLookup(tokenizer, {"my": _vectors(1), "my-style": _vectors(3, seed=1)}, HIDDEN)
    tokens = tokenize_prompt(tokenizer, "cat " * 73 + "my-style my", embeddings=lookup)
    assert tokens.chunks == 2 and tokens.token_count == 77
    assert tokens.ids[0, 74:].tolist() == [tokenizer.eos_token_id] * 3  # 73 words, then the chunk ends
    assert tokens.ids[1, 1:5].tolist() == [-1, -2, -3, -4]  # my-style (rows 0-2), then my (row 3): as found
    assert lookup.vectors.shape == (4, HIDDEN)
    with pytest.raises(InputError, match="embedding 'long': its vectors are .76, 32.; this text encoder takes 1 to "
                                         "75 vectors of 32"):
        EmbeddingLookup(tokenizer, {"long": _vectors(76)}, HIDDEN)


def test_the_wire_tensors_round_trip():
    embeddings = {"my-style": _vectors(3), "ünïcode": _vectors(1, seed=2)}
    tensors = embedding_tensors(embeddings, HIDDEN)
    assert tensors["embedding_sizes"].tolist() == [3, 1] and tensors["embedding_vectors"].shape == (4, HIDDEN)
    back = embeddings_from_tensors(*tensors.values())
    assert list(back) == list(embeddings) and all(np.array_equal(back[k], v) for k, v in embeddings.items())
    empty = embedding_tensors({}, HIDDEN)
    assert [t.shape for t in empty.values()] == [(0,), (0,), (0, HIDDEN)]
    assert embeddings_from_tensors(*empty.values()) == {}
    with pytest.raises(InputError, match="do not agree"):
        embeddings_from_tensors(tensors["embedding_names"], np.array([3, 2], np.int32), tensors["embedding_vectors"])


# -- the text encoder ------------------------------------------------------------------------------------------------
@slow
def test_without_vectors_the_text_encoder_is_clips_own_arithmetic(plain_checkpoint):
    """No id below 0: bit-identical to CLIPTextModel (every layer, clip skip, pooled output); with vectors, the rows
    they replace take exactly those vectors as their token embeddings."""
    import torch

    from build.sd.export import export_modules
    from build.sd.weights import load_sd

    loaded = load_sd(plain_checkpoint)
    module, model = export_modules(loaded)["text_encoder"], loaded.text_encoder
    ids = torch.randint(0, 40000, (3, 77))
    ids[:, 5:7] = torch.tensor([40000, 40001])  # tokens found nowhere else in the rows
    ids[:, -1] = 49407  # an end of text for the pooled output
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True, return_dict=True)
        hidden, pooled = module(ids, torch.tensor([1, 2, 3]), torch.zeros(1, HIDDEN))
        assert torch.equal(hidden[0], out.last_hidden_state[0]) and torch.equal(pooled, out.pooler_output)
        for row, skip in ((1, 2), (2, 3)):
            assert torch.equal(hidden[row], model.final_layer_norm(out.hidden_states[-skip][row]))
        vectors = torch.from_numpy(_vectors(2))
        marked = ids.clone()
        marked[:, 5:7] = torch.tensor([token_vector_id(0), token_vector_id(1)])
        with_vectors, _ = module(marked, torch.tensor([1, 1, 1]), vectors)
        kept = model.embeddings.token_embedding.weight.data
        swapped = kept.clone()
        swapped[40000], swapped[40001] = vectors[0], vectors[1]  # what diffusers does: the vectors as new tokens
        model.embeddings.token_embedding.weight.data = swapped
        try:
            assert torch.equal(with_vectors, model(ids).last_hidden_state)
        finally:
            model.embeddings.token_embedding.weight.data = kept


@slow
@pytest.mark.parametrize("variant", ["onnxruntime-int8", "openvino-fp32", "openvino-fp16", "openvino-int8",
                                     "openvino-bf16", "torch-fp32"])
def test_every_variant_of_the_text_encoder_takes_the_vectors(plain_checkpoint, plain_repo, tmp_path, variant):
    """Each variant checked against PyTorch on inputs where a quarter of the positions take vectors (the spec's
    samples), at other sizes than the export's, and with the one zero row a request without embeddings sends."""
    from build.convert import SD_VARIANTS, derive
    from build.sd import axis_sizes, sd_specs
    from build.sd.export import check_component, export_modules
    from build.sd.weights import load_sd
    from build.torch_export import export_program
    from tests.conftest import IMAGES

    loaded = load_sd(plain_checkpoint)
    spec, module, kind = sd_specs(loaded, IMAGES)["text_encoder"], export_modules(loaded)["text_encoder"], \
        SD_VARIANTS[variant]
    target = tmp_path / kind.artifact
    if kind.runtime == "torch":
        export_program(module, spec, kind, target, axis_sizes(loaded, batch=2))
    else:
        derive(kind, plain_repo / "sd_text_encoder" / "1" / "model.onnx", target)
    assert (spec.sample_inputs(1, **axis_sizes(loaded, batch=3, vectors=5))["input_ids"] < 0).mean() > 0.2
    for sizes in (axis_sizes(loaded, batch=3, chunks=2, vectors=5), axis_sizes(loaded, batch=1, vectors=1)):
        check_component(module, spec, target, sizes, variant=kind)  # raises ParityError outside the tolerance


# -- the loop: diffusers, Triton, what stays text, what is refused -------------------------------------------------
@pytest.fixture(scope="module")
def library(folder) -> EmbeddingLibrary:
    return EmbeddingLibrary(folder)


@pytest.fixture(scope="module")
def local_ti(model_repo, library) -> Pipeline:
    from orchestrator.pipeline.components.local import local_components

    return Pipeline(local_components(model_repo, embeddings=library))


@pytest.fixture(scope="module")
def served_ti(triton, library) -> Pipeline:
    from orchestrator.pipeline.components.triton import triton_components

    return Pipeline(triton_components(triton.grpc_url, embeddings=library))


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


BASE = dict(steps=4, sampler="Euler a", cfg_scale=7.5, seed=11, width=64, height=64)


@slow
def test_parity_with_diffusers_load_textual_inversion(local_ti, local, sd_checkpoint, folder):
    """diffusers adds the tokens my-style, my-style_1, my-style_2 and writes them for the word; kiln finds the word's
    token ids and puts the 3 vectors there: the same vectors at the same positions, prompt and negative prompt."""
    import torch
    from diffusers import StableDiffusionPipeline

    from orchestrator.pipeline import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(folder / "my-style.safetensors"), token="my-style")
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config))
    prompt, negative = "a photo of a cat in the style of my-style, blue", "blurry my-style"
    expected = (pipe(prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                     generator=torch.Generator().manual_seed(11), output_type="np").images * 255).round()
    result = local_ti.txt2img(Txt2ImgRequest(prompt=prompt, negative_prompt=negative, **BASE))
    assert _max_diff(result.images, expected.astype(np.uint8)) <= 2  # measured: 0
    as_text = local.txt2img(Txt2ImgRequest(prompt=prompt, negative_prompt=negative, **BASE)).images
    assert _max_diff(as_text, expected.astype(np.uint8)) > 2  # the vectors matter (measured: 29/255 apart)


@slow
def test_an_embedding_changes_the_image_and_other_words_stay_text(local_ti, local):
    def image(pipeline, prompt: str) -> np.ndarray:
        return pipeline.txt2img(Txt2ImgRequest(prompt=prompt, negative_prompt="blurry", **BASE)).images

    styled = image(local_ti, "a photo of a cat in the style of my-style")
    assert _max_diff(styled, image(local, "a photo of a cat in the style of my-style")) > 2  # the vectors act
    for text in ("a photo of a cat in the style of my-styles",  # no embedding of that name: text, as AUTOMATIC1111
                 "a photo of a cat in the style of wide-style"):  # another encoder's hidden size: skipped, text
        assert np.array_equal(image(local_ti, text), image(local, text)), text
    weighted = image(local_ti, "a photo of a cat in the style of (my-style:1.3)")
    assert _max_diff(weighted, styled) > 0  # emphasis applies to the vectors' positions


@slow
@pytest.mark.parametrize("case", ["prompt", "both, emphasis and BREAK", "long prompt", "none"])
def test_triton_gives_the_in_process_images(served_ti, local_ti, case):
    """The vectors travel with the prompts to sd_tokenizer (which reads no folder), through sd_text_encode to the text
    encoder: the same images as the in-process path; without an embedding, the zero-length tensors Triton takes."""
    request = Txt2ImgRequest(**{
        "prompt": dict(prompt="a photo of a cat in the style of my-style", negative_prompt="blurry"),
        "both, emphasis and BREAK": dict(prompt="a ((cat)) BREAK (my-style:0.8), [snow]",
                                         negative_prompt="my-style, blurry"),
        "long prompt": dict(prompt="cat, " * 36 + "my-style my-style", negative_prompt=""),
        "none": dict(prompt="a photo of a cat", negative_prompt="blurry"),
    }[case], **BASE)
    through_triton, in_process = served_ti.generate(request), local_ti.generate(request)
    assert np.array_equal(through_triton.images, in_process.images), case


@slow
def test_a_pickled_file_and_a_build_before_embeddings_are_refused_by_name(served_ti, local_ti, model_repo, library):
    from orchestrator.pipeline.components.local import LocalTextEncoder
    from orchestrator.pipeline.components.triton import TritonTextEncoder

    for pipeline in (local_ti, served_ti):
        with pytest.raises(InputError, match="embedding 'old-style': old-style.pt is a pickled file"):
            pipeline.txt2img(Txt2ImgRequest(prompt="a cat by old-style", **BASE))
    # A build before embeddings: its contract says 0, and a prompt that names one cannot be run as asked.
    local_encoder, served_encoder = local_ti.components.text_encoder, served_ti.components.text_encoder

    def ids_only(inputs: dict) -> dict:  # an old build's text encoder: no token_vectors input
        assert "token_vectors" not in inputs
        return local_encoder.runner(inputs | {"token_vectors": np.zeros((1, HIDDEN), np.float32)})

    old = [LocalTextEncoder(local_encoder.tokenizer, ids_only, 8, 5, 0, library),
           TritonTextEncoder(served_encoder.client, 5, 0, library)]
    for encoder in old:
        with pytest.raises(InputError, match="'my-style', which this build's text encoder cannot take .*rebuild with "
                                             "`kiln build sd`"):
            encoder.encode(["a photo in the style of my-style", ""])
    assert served_ti.contract.textual_inversion_dim == HIDDEN
    old_local = Pipeline(replace(local_ti.components, text_encoder=old[0]))
    plain = old_local.txt2img(Txt2ImgRequest(prompt="a photo of a cat", **BASE)).images  # no name: runs as before
    assert np.array_equal(plain, local_ti.txt2img(Txt2ImgRequest(prompt="a photo of a cat", **BASE)).images)


# -- the routes, over real HTTP --------------------------------------------------------------------------------------
@slow
def test_list_refresh_and_use_over_http(triton, tmp_path, folder):
    import shutil

    from kiln.triton_server import free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    mine = tmp_path / "embeddings"
    shutil.copytree(folder, mine)
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), embeddings_dir=mine))
    try:
        with live.client() as client:
            listing = client.get("/sdapi/v1/embeddings").json()
            assert listing["loaded"]["my-style"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                     "shape": HIDDEN, "vectors": 3}
            assert listing["skipped"] == {"wide-style": {"step": None, "sd_checkpoint": None,
                                                         "sd_checkpoint_name": None, "shape": 48, "vectors": 2}}
            body = {"prompt": "a photo in the style of my-style", "negative_prompt": "blurry", "steps": 3,
                    "seed": 4, "width": 64, "height": 64, "sampler_name": "Euler a"}
            styled = client.post("/sdapi/v1/txt2img", json=body)
            assert styled.status_code == 200, styled.text
            stamp = mine.stat().st_mtime_ns
            write_embedding(mine / "my-style.safetensors", _vectors(2, seed=9))  # replaced in place
            os.utime(mine, ns=(stamp, stamp))
            assert client.get("/sdapi/v1/embeddings").json()["loaded"]["my-style"]["vectors"] == 3
            assert client.post("/sdapi/v1/refresh-embeddings").json() is None
            assert client.get("/sdapi/v1/embeddings").json()["loaded"]["my-style"]["vectors"] == 2
            again = client.post("/sdapi/v1/txt2img", json=body)
            assert again.status_code == 200 and again.json()["images"][0] != styled.json()["images"][0]
            refused = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a cat by old-style"})
            assert refused.status_code == 422 and "old-style.pt is a pickled file" in refused.text, refused.text
    finally:
        live.stop()
