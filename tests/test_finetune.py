"""`kiln finetune vit` -> `kiln build vit` -> Triton: the user's own classes, learnt, built, served, named.

Trained on generated data (the shipped photographs, cropped and then tinted warm, tinted cool or made gray:
`kiln finetune example-data`), a ViT-Tiny from seeded random weights for speed, in fp32 so that no figure here
depends on whether this CPU has bf16 instructions.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from build.report import read_report
from build.vit import ViTBuildOptions, build_vit
from build.vit.dataset import check_images, read_labelled, split, write_example_dataset
from build.vit.finetune import FinetuneOptions, finetune_vit
from build.vit.resources import pick_precision
from build.vit.spec import spec_facts, spec_for
from build.vit.weights import load_vit
from kiln.errors import ConfigError, WeightsError
from kiln.machine import machine
from tests.conftest import start_triton

TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CLASSES = ["cool", "gray", "warm"]  # the example's folders, sorted: the class indices


def options(data: Path, out: Path, **overrides) -> FinetuneOptions:
    """A ViT-Tiny from seeded random weights, no augmentation that could erase the tint, fp32, quiet."""
    return FinetuneOptions(**{"data": data, "out": out, "model": TINY, "random_init": True, "epochs": 8,
                              "batch_size": 8, "lr": 1e-3, "layer_decay": None, "auto_augment": None,
                              "color_jitter": 0.0, "precision": "fp32", "progress": False} | overrides)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_example_dataset(tmp_path_factory.mktemp("finetune") / "data", per_class=20, seed=0)


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "tuned"
    return finetune_vit(options(data, out), log=lambda _m: None)


def test_the_fine_tuned_model_beats_chance_and_writes_a_servable_folder(tuned):
    assert tuned.classes == CLASSES
    assert tuned.best_accuracy >= 0.75 > 1 / 3  # chance on three balanced classes is 1/3
    out = tuned.out
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == CLASSES and config["num_classes"] == 3
    assert config["architecture"] == "vit_tiny_patch16_224"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 8 and metrics["best"]["accuracy"] == tuned.best_accuracy
    assert metrics["machine"]["isa"] == machine()["isa"] and metrics["history"][0]["images_per_s"] > 0
    assert Image.open(out / "curves.png").format == "PNG"
    chosen = json.loads((out / "split.json").read_text())
    train, val = {e["path"] for e in chosen["train"]}, {e["path"] for e in chosen["val"]}
    assert len(val) == 12 and len(train) == 48 and not train & val  # 4 of each class's 20 held out
    # What the folder holds is what the run reported: load_vit reads it back with its labels.
    loaded = load_vit(out)
    assert loaded.labels == tuple(CLASSES) and {str(p) for p in loaded.images} == train
    # The written weights are the best epoch's: PyTorch's accuracy with them is the one the run recorded.
    truth = [CLASSES.index(Path(p).parent.name) for p in sorted(val)]
    assert (_pytorch_top1(loaded.model, sorted(val)) == truth).mean() == pytest.approx(tuned.best_accuracy)


def _pytorch_top1(model, paths) -> np.ndarray:
    import timm.data

    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        return model.eval()(pixels).argmax(-1).numpy()


@pytest.mark.slow
def test_built_and_served_it_answers_with_the_folder_names(tuned, tmp_path, kiln):
    """kiln build vit --weights OUT: int8 calibrated on the training images; Triton's top-1 = PyTorch's on the
    validation images, the labels the folder names (kiln classify prints them); the API checks `layer` against the
    served depth."""
    from kiln.triton_server import free_port
    from kiln.vit import ViTClient
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    repo = tmp_path / "repo"
    code, out, err = kiln("build", "vit", "--weights", tuned.out, "--variants", "openvino-int8", "--no-extra-exports",
                          "--repo", repo)
    if code != 0:
        # The int8 parity of this tiny model, trained from random weights on 48 images, is a draw of the training's
        # arithmetic: the seed fixes it on one CPU (0.9994 on the AVX2 EPYC), but another ISA's sums train another
        # model, and some of those fall outside 0.98 in int8 (0.95 with seed 3 here). Then the build must refuse it by
        # name and remove it, and the rest of this test runs on the fp32 build.
        assert "openvino-int8 (logits) is outside its tolerance" in err and "The artifact was removed" in err, err
        code, out, err = kiln("build", "vit", "--weights", tuned.out, "--variants", "openvino-fp32",
                              "--no-extra-exports", "--repo", repo)
    assert code == 0 and "served: vit = onnxruntime-fp32" in out, err
    report = read_report(repo)["vit"]
    assert report["labels"] == {"source": "weights", "count": 3, "first": CLASSES}
    assert report["shape"] == {"blocks": 12, "classes": 3, "width": 192, "tokens": 197, "size": 224}
    train_names = {Path(e["path"]).name for e in json.loads((tuned.out / "split.json").read_text())["train"]}
    assert set(report["parity_images"]) <= train_names  # parity and int8 calibration on the user's own images
    if "openvino-int8" in report["artifacts"]:
        assert report["artifacts"]["openvino-int8"]["parity"]["logits"]["top1"] >= 0.9

    val = sorted(Path(e["path"]) for e in json.loads((tuned.out / "split.json").read_text())["val"])
    expected = _pytorch_top1(load_vit(tuned.out).model, val)
    server = start_triton(repo, tmp_path / "triton.log")
    try:
        client = ViTClient(server.grpc_url)
        results = client.classify([(p.name, p.read_bytes()) for p in val], top_k=5)
        assert all(r.error is None for r in results), [r.error for r in results]
        assert all(sorted(r.labels) == CLASSES for r in results)  # top 5 of 3 classes: all three, ranked
        assert [r.indices[0] for r in results] == expected.tolist()
        assert [r.labels[0] for r in results] == [CLASSES[i] for i in expected]
        code, out, err = kiln("classify", val[0], val[-1], "--url", server.grpc_url, "--top-k", "1", "--json")
        assert code == 0, err
        assert [r["top"][0]["label"] for r in json.loads(out)] == [CLASSES[expected[0]], CLASSES[expected[-1]]]
        embedding = client.embed_one(val[0].read_bytes(), layer=-1, tokens=True)
        assert embedding.embedding.shape == (192,) and embedding.tokens.shape == (197, 192) and embedding.layer == 11
        api = BackgroundAPI(Settings(triton_url=server.grpc_url, port=free_port()))
        try:
            image = base64.b64encode(val[0].read_bytes()).decode()
            answer = requests.post(f"{api.url}/v1/classify", json={"images": [image], "top_k": 2}, timeout=60)
            assert answer.status_code == 200 and answer.json()["results"][0]["top"][0]["label"] in CLASSES
            deep = requests.post(f"{api.url}/v1/embed", json={"images": [image], "layer": 12}, timeout=60)
            assert deep.status_code == 422 and "[-12, 11]" in deep.text and "12 blocks" in deep.text
        finally:
            api.stop()
    finally:
        server.stop()


def test_resume_continues_the_run_and_refuses_other_labels(tuned, data, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(tuned.out, out)
    result = finetune_vit(options(data, out, epochs=9, resume=True), log=lambda _m: None)
    assert [row["epoch"] for row in result.metrics["history"]] == list(range(1, 10))
    with pytest.raises(ConfigError, match="already finished its 9 epochs"):
        finetune_vit(options(data, out, epochs=9, resume=True), log=lambda _m: None)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    shutil.copytree(data / "gray", other / "sepia")
    with pytest.raises(ConfigError, match=r"trained on classes \['cool', 'gray', 'warm'\].*'sepia'"):
        finetune_vit(options(other, out, epochs=12, resume=True), log=lambda _m: None)


def test_the_seed_makes_a_run_repeatable(data, tmp_path):
    """Same data, options and seed: the same weights, whatever state Python's and numpy's generators were in (timm's
    random crops and RandAugment draw from them; unseeded, two runs differed, and the int8 build's parity with them)."""
    import random

    weights = []
    for state in (1, 2):
        random.seed(state)  # what earlier code left in the global generators
        np.random.seed(state)
        out = tmp_path / f"run{state}"
        finetune_vit(options(data, out, epochs=1, freeze_blocks=11, auto_augment="rand-m9-mstd0.5"),
                     log=lambda _m: None)
        weights.append(load_vit(out).model.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_freezing_ema_mixup_and_accumulation(data, tmp_path):
    """The rest of the recipe in one short run: frozen blocks stay as they were, the EMA is validated beside the
    model, mixup/cutmix and RandAugment run, and an optimizer step spans two batches."""
    result = finetune_vit(options(data, tmp_path / "out", epochs=1, freeze_blocks=10, ema=0.9, mixup=0.8,
                                  cutmix=1.0, accumulate=2, auto_augment="rand-m9-mstd0.5", color_jitter=0.4,
                                  layer_decay=0.75, label_smoothing=0.1, patience=1), log=lambda _m: None)
    row = result.metrics["history"][0]
    assert "ema_val_accuracy" in row and result.kept in ("model", "ema")
    assert result.metrics["frozen_parameters"] > 0.8 * sum(p.numel() for p in load_vit(result.out).model.parameters())
    torch.manual_seed(0)
    import timm

    start = timm.create_model(TINY, pretrained=False)
    tuned = load_vit(result.out).model
    for name in ("patch_embed.proj.weight", "blocks.9.mlp.fc2.weight", "pos_embed"):
        assert torch.equal(tuned.state_dict()[name], start.state_dict()[name]), name
    trained = "blocks.11.mlp.fc2.weight"
    assert not torch.equal(tuned.state_dict()[trained], start.state_dict()[trained])


def test_bad_data_is_refused_by_name(tmp_path, data):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "dogs").mkdir()
    Image.new("RGB", (32, 32)).save(empty / "dogs" / "a.png")
    with pytest.raises(ConfigError, match="class folder .*cats has no images"):
        read_labelled(empty)
    one = tmp_path / "one"
    shutil.copytree(data / "warm", one / "warm")
    with pytest.raises(ConfigError, match="one class only \\(warm\\)"):
        finetune_vit(options(one, tmp_path / "o1"), log=lambda _m: None)
    with pytest.raises(ConfigError, match="neither a folder"):
        read_labelled(tmp_path / "missing")
    # Unreadable images are skipped and counted up to the limit, then refused with the first few named.
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "gray" / "truncated.jpg").write_bytes((data / "gray" / "gray_000.jpg").read_bytes()[:200])
    (broken / "warm" / "text.png").write_text("not an image")
    classes, pairs = read_labelled(broken)
    good, bad = check_images(pairs, max_bad=0.05)
    assert len(good) == 60 and sorted(Path(p).name for p, _ in bad) == ["text.png", "truncated.jpg"]
    with pytest.raises(ConfigError, match="2 of 62 images cannot be read.*allows \\(0\\).*text.png"):
        check_images(pairs, max_bad=0.01)
    assert len(split(classes, good, 0.2, 0, bad).skipped) == 2
    # A CSV of path,label (relative to the CSV) reads like the folders.
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in pairs[:4]) +
                     "".join(f"{p.relative_to(tmp_path)},{label}\n" for p, label in pairs[-4:]))
    classes, rows = read_labelled(table)
    assert classes == ["cool", "warm"] and len(rows) == 8 and all(p.exists() for p, _ in rows)


def test_bad_settings_are_refused_before_training(data, tmp_path, kiln):
    code, _, err = kiln("finetune", "vit", "--data", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert code == 2 and "kiln finetune: error: " in err and "nowhere: neither a folder" in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError, match="no model 'vit_tiny_patch16_244'; did you mean vit_tiny_patch16_224"):
        finetune_vit(options(data, tmp_path / "a", model="vit_tiny_patch16_244"), log=lambda _m: None)
    with pytest.raises(ConfigError, match="ResNet is not one of timm's VisionTransformer models"):
        finetune_vit(options(data, tmp_path / "b", model="resnet18"), log=lambda _m: None)
    # Too little memory: refused with the batch size that would fit (and the accumulation that keeps the batch).
    with pytest.raises(ConfigError, match=r"batch size 64 needs about .* GiB.*--batch-size \d+ \(with --accumulate"):
        finetune_vit(options(data, tmp_path / "c", batch_size=64, max_memory_gb=0.5), log=lambda _m: None)
    with pytest.raises(ConfigError, match="--resume: .*checkpoint.pt does not exist"):
        finetune_vit(options(data, tmp_path / "d", resume=True), log=lambda _m: None)
    with pytest.raises(ConfigError, match="inc1.*posterize to 0 bits"):
        finetune_vit(options(data, tmp_path / "f", auto_augment="rand-m9-mstd0.5-inc1"), log=lambda _m: None)
    with pytest.raises(ConfigError, match="--freeze-blocks 13: the model has 12 blocks"):
        finetune_vit(options(data, tmp_path / "e", freeze_blocks=13), log=lambda _m: None)
    # auto: bf16 exactly where this CPU has bf16 instructions (whichever CI has), never fp16 on a CPU.
    has_bf16 = any("bf16" in f for f in machine()["isa"])
    assert pick_precision("auto", torch.device("cpu")) == ("bf16" if has_bf16 else "fp32")
    with pytest.raises(ConfigError, match="fp16 trains on a CUDA GPU only"):
        pick_precision("fp16", torch.device("cpu"))


def test_timm_synset_names_are_served_as_their_descriptions(tmp_path):
    import timm

    from build.vit.weights import save_vit_checkpoint

    folder = save_vit_checkpoint(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2),
                                 tmp_path, "vit_tiny_patch16_224", labels=["n01440764", "n01443537"])
    config = json.loads((folder / "config.json").read_text())
    config["label_descriptions"] = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus"}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_vit(folder).labels == ("tench, Tinca tinca", "goldfish, Carassius auratus")
    config["label_names"] = ["only one"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="1 label_names for a model with 2 classes"):
        load_vit(folder)


@pytest.mark.parametrize(("name", "facts"), [
    ("vit_tiny_patch16_384", {"blocks": 12, "classes": 1000, "width": 192, "tokens": 577, "size": 384}),
    ("vit_small_patch16_224", {"blocks": 12, "classes": 1000, "width": 384, "tokens": 197, "size": 224}),
    ("vit_large_patch14_clip_224", {"blocks": 24, "classes": 1000, "width": 1024, "tokens": 257, "size": 224}),
    ("vit_base_patch16_reg4_gap_256", {"blocks": 12, "classes": 1000, "width": 768, "tokens": 260, "size": 256}),
])
def test_the_spec_comes_from_timm(name, facts):
    import timm

    with torch.device("meta"):  # the shapes only: no memory for Large's weights
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    assert spec_facts(spec_for(model)) == facts


@pytest.mark.slow
def test_another_size_builds_with_its_own_shapes(tmp_path):
    """A ViT-Tiny at 384 pixels (577 tokens): exported, checked and configured from its own spec."""
    import timm

    from build.vit.weights import save_vit_checkpoint
    from kiln.model_config import read_config

    torch.manual_seed(0)
    folder = save_vit_checkpoint(timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=5),
                                 tmp_path / "weights", "vit_tiny_patch16_384", labels=list("abcde"))
    repo = tmp_path / "repo"
    build_vit(ViTBuildOptions(weights=str(folder), variants=(), extra_exports=(), repository=repo, progress=False),
              log=lambda _m: None)
    report = read_report(repo)["vit"]
    assert report["artifacts"]["onnxruntime-fp32"]["parity"]["logits"]["cosine"] >= 0.99999
    assert report["preprocess"]["crop"] == [384, 384]
    embed = read_config(repo / "vit_embed" / "config.pbtxt")
    assert [list(o.dims) for o in embed.output] == [[192], [577, 192]]
    assert json.loads((repo / "vit_postprocess" / "1" / "labels.json").read_text()) == list("abcde")


@pytest.mark.slow
def test_a_short_vit_b16_run(tmp_path):
    """The default size, briefly: ViT-B/16, ten blocks frozen, one epoch on two classes, written and readable."""
    data = write_example_dataset(tmp_path / "data", per_class=4, seed=1)
    shutil.rmtree(data / "cool")
    result = finetune_vit(options(data, tmp_path / "out", model="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                                  epochs=1, batch_size=4, freeze_blocks=10), log=lambda _m: None)
    assert result.classes == ["gray", "warm"] and result.metrics["shape"]["width"] == 768
    assert load_vit(result.out).labels == ("gray", "warm")
