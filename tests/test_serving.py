"""End to end on a real Triton server: both ensembles over gRPC and HTTP, batching, and bad input."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from build.vit.export import reference_outputs
from clients.vit import ViTClient
from kiln.cli.classify import read_images
from kiln.imaging import decode_image
from tests.conftest import encode, png_header_only

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(vit_model, sample_images):
    """PyTorch's softmax top-5 and features for the sample images, via timm's own transform."""
    import timm.data

    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=vit_model))
    pixels = np.stack([tf(decode_image(p.read_bytes())).numpy() for p in sample_images])
    out = reference_outputs(vit_model, pixels, np.full((len(pixels), 1), 4, dtype=np.int64))
    probs = torch.softmax(torch.from_numpy(out["logits"]), -1).numpy()
    return {"top5": np.argsort(-probs, axis=1)[:, :5], "probs": probs, **out}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_classify_matches_pytorch(triton, sample_images, reference, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    results = ViTClient(url, protocol).classify(read_images(sample_images), top_k=5)
    for i, result in enumerate(results):
        assert result.error is None, result.error
        assert result.indices == reference["top5"][i].tolist(), result.image
        np.testing.assert_allclose(result.scores, reference["probs"][i][reference["top5"][i]], rtol=1e-4, atol=1e-6)
        assert len(result.labels) == 5 and all(isinstance(label, str) and label for label in result.labels)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_embed_matches_pytorch(triton, sample_images, reference, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    results = ViTClient(url, protocol).embed(read_images(sample_images), layer=4, tokens=True)
    for i, result in enumerate(results):
        assert result.error is None, result.error
        assert result.embedding.shape == (64,) and result.tokens.shape == (197, 64)  # the tests' ViT is 64 wide
        np.testing.assert_allclose(result.embedding, reference["pooled"][i], atol=1e-4)
        np.testing.assert_allclose(result.tokens, reference["tokens"][i], atol=1e-4)


def test_top_k_and_layer_are_validated(triton, sample_images):
    client = ViTClient(triton.grpc_url)
    data = sample_images[0].read_bytes()
    assert len(client.classify_one(data, top_k=1000).labels) == 1000
    for bad_k in (0, 1001):
        assert "top_k must be between 1 and 1000" in client.classify([("x", data)], top_k=bad_k)[0].error
    assert "layer must be in [-12, 11]" in client.embed([("x", data)], layer=12)[0].error
    default = _raw_infer(triton, "vit_classify", [("image", np.array([[data]], dtype=object), "BYTES")])
    assert default.as_numpy("labels").shape == (1, 5)  # top_k left out: the default, 5
    last = client.embed_one(data, layer=-1)
    assert np.allclose(last.embedding, client.embed_one(data, layer=11).embedding)


def _model_stats(server, model: str, inferences: int = 0) -> dict:
    """Triton's counters for `model`, read once they are settled (they are updated after responses go out, so a
    client can read them first: seen under load): at least `inferences` counted, the same twice 0.1 s apart, or 5 s
    gone."""
    def read() -> dict:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats") as response:
            stats = json.load(response)["model_stats"][0]
        return {"inferences": int(stats["inference_count"]), "executions": int(stats["execution_count"])}

    previous = read()
    for _ in range(50):
        time.sleep(0.1)
        current = read()
        if current == previous and current["inferences"] >= inferences:
            return current
        previous = current
    return previous


def test_concurrent_requests_are_correct_and_batched(triton, sample_images, reference):
    client = ViTClient(triton.grpc_url, concurrency=16)
    before = _model_stats(triton, "vit")
    images = read_images(sample_images) * 4  # 24 requests from 16 threads
    results = client.classify(images, top_k=5)
    after = _model_stats(triton, "vit")
    for i, result in enumerate(results):
        assert result.error is None
        assert result.indices == reference["top5"][i % len(sample_images)].tolist()
    inferences = after["inferences"] - before["inferences"]
    executions = after["executions"] - before["executions"]
    assert inferences == len(images)
    assert executions < inferences, f"dynamic batching never merged requests ({executions} executions)"


BAD_IMAGES = {
    "corrupt bytes": (b"\xff\xd8\xff\xe0 definitely not a jpeg", "corrupt or truncated image"),
    "not an image": (b"hello, world" * 10, "cannot decode image"),
    "1x1 image": (encode(Image.new("RGB", (1, 1))), "too small"),
    "20000x20000 header": (png_header_only(20000, 20000), "refused before decoding"),
    "empty element": (b"", "0 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_fails_alone_while_good_ones_in_the_same_batch_succeed(triton, sample_images, reference, case):
    data, message = BAD_IMAGES[case]
    good = sample_images[0].read_bytes()
    client = ViTClient(triton.grpc_url, concurrency=8)
    # Sent together, so the dynamic batcher sees the bad request next to good ones.
    results = client.classify([("good", good)] * 3 + [("bad", data)] + [("good", good)] * 3, top_k=5)
    for result in results:
        if result.image == "bad":
            assert result.error and message in result.error, result.error
            assert "Traceback" not in result.error
        else:
            assert result.error is None and result.indices == reference["top5"][0].tolist()
    assert triton.is_running() and ViTClient(triton.grpc_url).is_ready()


def test_a_request_of_many_images_is_decoded_side_by_side_and_fails_whole_on_one_bad_image(triton, sample_images,
                                                                                         reference):
    """vit_preprocess decodes the images of a call on its thread pool: each row keeps its place, and one bad image
    fails its own request (naming the problem) while the request beside it succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    payloads = [p.read_bytes() for p in sample_images]
    good = np.array([[payloads[i % len(payloads)]] for i in range(2 * len(payloads))], dtype=object)
    bad = good.copy()
    bad[3, 0] = BAD_IMAGES["corrupt bytes"][0]
    with ThreadPoolExecutor(2) as pool:  # sent together: the batcher may give both to one execute() call
        outcomes = [pool.submit(_raw_infer, triton, "vit_classify", [("image", rows, "BYTES")]) for rows in (good, bad)]
        indices = outcomes[0].result().as_numpy("indices")
        with pytest.raises(InferenceServerException, match="corrupt or truncated image"):
            outcomes[1].result()
    for row, expected in enumerate(indices):
        assert expected[:5].tolist() == reference["top5"][row % len(payloads)].tolist(), row
    assert triton.is_running()


def test_bad_input_is_the_clients_error_over_grpc_and_http(triton):
    """A corrupt image or a bad top_k is answered as the request's fault (gRPC INVALID_ARGUMENT, HTTP 400), not as
    a server error, so clients and proxies can tell them apart."""
    import tritonclient.http as httpclient

    corrupt = np.array([[BAD_IMAGES["corrupt bytes"][0]]], dtype=object)
    with pytest.raises(InferenceServerException) as grpc_error:
        _raw_infer(triton, "vit_classify", [("image", corrupt, "BYTES")])
    assert "INVALID_ARGUMENT" in str(grpc_error.value.status()) and "corrupt or truncated" in grpc_error.value.message()
    good = np.array([[encode(Image.new("RGB", (32, 32), "white"))]], dtype=object)
    with pytest.raises(InferenceServerException) as top_k_error:
        _raw_infer(triton, "vit_classify", [("image", good, "BYTES"), ("top_k", np.array([[0]], np.int32), "INT32")])
    assert "INVALID_ARGUMENT" in str(top_k_error.value.status()), top_k_error.value
    http = httpclient.InferenceServerClient(triton.http_url)
    tensor = httpclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(corrupt)
    with pytest.raises(InferenceServerException) as http_error:
        http.infer("vit_classify", [tensor])
    assert str(http_error.value.status()) == "400", http_error.value
    assert triton.is_running()


def _raw_infer(server, model, inputs):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensors = []
    for name, array, dtype in inputs:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client.infer(model, tensors)


@pytest.mark.parametrize("inputs, message", [
    ([("image", np.array([[b"x"]], dtype=object), "BYTES"), ("top_k", np.array([[1.5]], np.float32), "FP32")],
     "data-type"),
    ([("pixel_values", np.zeros((1, 3, 100, 100), np.float32), "FP32")], "shape"),
    ([("pixel_values", np.zeros((1, 3, 224, 224), np.float64), "FP64")], "data-type"),
])
def test_wrong_dtype_or_shape_is_rejected_by_triton(triton, inputs, message):
    model = "vit_classify" if inputs[0][0] == "image" else "vit"
    with pytest.raises(InferenceServerException, match=message):
        _raw_infer(triton, model, inputs)
    assert triton.is_running()


def test_non_finite_pixels_fail_that_request(triton):
    bad = np.full((1, 3, 224, 224), np.nan, np.float32)
    with pytest.raises(InferenceServerException, match="NaN") as info:
        _raw_infer(triton, "vit", [("pixel_values", bad, "FP32")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"  # the request's fault (HTTP 400), not the server's
    good = _raw_infer(triton, "vit", [("pixel_values", np.zeros((2, 3, 224, 224), np.float32), "FP32")])
    assert good.as_numpy("logits").shape == (2, 1000)


def test_vit_takes_uint8_pixels_as_the_same_image(triton, sample_images, vit_model):
    """`pixels` (uint8, resized and cropped) is the image as `pixel_values` is, with a quarter of the bytes: the model
    scales it to the very same floats, so the outputs are the same; one of the two, never both or neither."""
    from build.vit.transform import eval_transform
    from kiln.imaging import preprocess

    transform = eval_transform(vit_model)
    data = [p.read_bytes() for p in sample_images[:3]]
    raw = np.stack([preprocess(d, transform, scaled=False) for d in data])
    floats = _raw_infer(triton, "vit", [("pixel_values", transform.normalize(raw), "FP32")]).as_numpy("logits")
    scaled = _raw_infer(triton, "vit", [("pixels", raw, "UINT8")]).as_numpy("logits")
    np.testing.assert_array_equal(scaled, floats)
    for inputs, named in (([("pixels", raw, "UINT8"), ("pixel_values", transform.normalize(raw), "FP32")],
                           "pixel_values and pixels"), ([("layer", np.full((1, 1), 3, np.int64), "INT64")], "neither")):
        with pytest.raises(InferenceServerException, match=f"exactly one of pixel_values .* not {named}") as info:
            _raw_infer(triton, "vit", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert triton.is_running()


@pytest.fixture(scope="module")
def uint8_wire_repo(vit_repo, vit_model, tmp_path_factory) -> Path:
    """vit_repo's models with vit_preprocess handing `vit` uint8 pixels (`--pixel-wire uint8`, a GPU build's way):
    its config and the ensembles' regenerated by the build's own code, which first gives back vit_repo's configs
    (so the wire is the only change); the other models linked."""
    from build.vit import ViTBuildOptions
    from build.vit.configs import vit_model_configs
    from build.vit.spec import VIT_SPEC, spec_for
    from kiln.imaging import EvalTransform
    from kiln.model_config import read_parameters

    transform = EvalTransform.from_json(read_parameters(vit_repo / "vit_preprocess" / "config.pbtxt")[0]["transform"])
    spec = spec_for(vit_model, VIT_SPEC)  # the tests' ViT's shapes (64 wide)
    for config in vit_model_configs(ViTBuildOptions(random_weights=True), transform, spec):
        assert config.to_pbtxt() == (vit_repo / config.name / "config.pbtxt").read_text(), config.name
    return _rewired(vit_repo, ViTBuildOptions(random_weights=True, pixel_wire="uint8"), transform, spec,
                    tmp_path_factory.mktemp("uint8_wire"))


def _rewired(vit_repo: Path, options, transform, spec, repo: Path) -> Path:
    """vit_repo's models under the configs `options` give (written by the build's own code), the rest linked."""
    from build.vit.configs import vit_model_configs

    for config in vit_model_configs(options, transform, spec):
        if config.name == "vit":  # the same config either way: it takes both
            assert config.to_pbtxt() == (vit_repo / config.name / "config.pbtxt").read_text()
        (repo / config.name).mkdir()
        for entry in (vit_repo / config.name).iterdir():
            if entry.name != "config.pbtxt":
                (repo / config.name / entry.name).symlink_to(entry.resolve())
        (repo / config.name / "config.pbtxt").write_text(config.to_pbtxt())
    return repo


def test_torch_decode_serves_the_decoders_pixels_and_fails_a_bad_image_alone(vit_repo, vit_model, tmp_path,
                                                                             sample_images):
    """--decode torch, served here on the CPU (torchvision's libjpeg-turbo; nvJPEG on a GPU): vit_preprocess hands
    `vit` exactly kiln.runtime.torch_decode's pixels for a batch of JPEGs and a PNG (which goes through PIL), the
    classification runs on them, and a corrupt image fails its own request with PIL's message."""
    from build.vit import ViTBuildOptions
    from build.vit.spec import VIT_SPEC, spec_for
    from kiln.imaging import EvalTransform
    from kiln.model_config import read_parameters
    from kiln.runtime.torch_decode import TorchDecoder
    from tests.conftest import start_triton

    transform = EvalTransform.from_json(read_parameters(vit_repo / "vit_preprocess" / "config.pbtxt")[0]["transform"])
    options = ViTBuildOptions(random_weights=True, pixel_wire="uint8", decode="torch")
    (tmp_path / "repo").mkdir()
    repo = _rewired(vit_repo, options, transform, spec_for(vit_model, VIT_SPEC), tmp_path / "repo")
    assert read_parameters(repo / "vit_preprocess" / "config.pbtxt")[0]["decode"] == "torch"
    payloads = [p.read_bytes() for p in sample_images if p.suffix in (".jpg", ".png")]
    decoder = TorchDecoder(transform)
    assert 0 < sum(map(decoder.decodes, payloads)) < len(payloads)  # JPEGs by torchvision, the PNGs by PIL
    server = start_triton(repo, tmp_path / "triton.log")
    try:
        images = np.array([[data] for data in payloads], dtype=object)
        out = _raw_infer(server, "vit_preprocess", [("image", images, "BYTES")])
        np.testing.assert_array_equal(out.as_numpy("pixels"), np.stack([p.numpy() for p in decoder(payloads)]))
        labels = _raw_infer(server, "vit_classify", [("image", images, "BYTES")]).as_numpy("indices")
        assert labels.shape[0] == len(payloads)
        with pytest.raises(InferenceServerException, match="vit_preprocess: corrupt or truncated image"):
            _raw_infer(server, "vit_classify", [("image", np.array([[payloads[0][:400]]], dtype=object), "BYTES")])
    finally:
        server.stop()


def test_the_uint8_wire_classifies_and_embeds_as_the_float32_one(uint8_wire_repo, tmp_path, sample_images, reference):
    """vit_preprocess -> uint8 pixels -> vit (which scales them) gives PyTorch's outputs through both ensembles, as
    the float32 wire does: a GPU build's default path, served here on the CPU."""
    from kiln.imaging import EvalTransform, preprocess
    from kiln.model_config import read_parameters
    from tests.conftest import start_triton

    server = start_triton(uint8_wire_repo, tmp_path / "triton.log")
    try:
        images = read_images(sample_images)
        client = ViTClient(server.grpc_url)
        for i, result in enumerate(client.classify(images, top_k=5)):
            assert result.error is None, result.error
            assert result.indices == reference["top5"][i].tolist()
            np.testing.assert_allclose(result.scores, reference["probs"][i][reference["top5"][i]], rtol=1e-4,
                                       atol=1e-6)
        for i, result in enumerate(client.embed(images, layer=4, tokens=True)):
            assert result.error is None, result.error
            np.testing.assert_allclose(result.embedding, reference["pooled"][i], atol=1e-4)
            np.testing.assert_allclose(result.tokens, reference["tokens"][i], atol=1e-4)
        data = sample_images[0].read_bytes()  # what vit_preprocess hands on: the uint8 pixels themselves
        out = _raw_infer(server, "vit_preprocess", [("image", np.array([[data]], dtype=object), "BYTES")])
        transform = EvalTransform.from_json(
            read_parameters(uint8_wire_repo / "vit_preprocess" / "config.pbtxt")[0]["transform"])
        np.testing.assert_array_equal(out.as_numpy("pixels"), preprocess(data, transform, scaled=False)[None])
    finally:
        server.stop()


def test_bench_vit_wire_sends_both_wires_both_ways_and_checks_each_answer(tmp_path, kiln):
    """`kiln bench vit-wire`: the served vit (its model.py, byte_inputs) over a probe artifact, float32 and uint8 over
    gRPC and shared memory; each call's answer is checked against the floats' means (a wrong scaling fails the run)."""
    from benchmarks.vit_wire import ARMS

    code, out, err = kiln("bench", "vit-wire", "--batch-sizes", "2", "--calls", "1", "--out", tmp_path)
    assert code == 0, err
    saved = json.loads((tmp_path / "vit-wire.json").read_text())
    assert [(r["wire"], r["mode"]) for r in saved["rows"]] == list(ARMS) and "| 2 | uint8 | shared memory |" in out
    megabytes = {r["wire"]: r["megabytes_in"] for r in saved["rows"]}
    assert megabytes["float32"] == pytest.approx(4 * megabytes["uint8"], rel=0.02)
    assert all(r["p50_ms"] > 0 and r["compute_infer_ms"] > 0 for r in saved["rows"])
    assert (tmp_path / "vit-wire.png").stat().st_size > 10_000 and saved["machine"]["isa"]


def test_metrics_endpoint_counts_requests(triton):
    with urllib.request.urlopen(triton.metrics_url) as response:
        text = response.read().decode()
    assert 'nv_inference_request_success{model="vit_classify"' in text


def test_requests_merged_into_one_call_keep_their_places_and_fail_alone(tmp_path):
    """vit_preprocess with a long batching window, so that Triton hands three concurrent requests to one execute()
    call: the pool decodes their six images together, each request gets its own rows back, and the one with a corrupt
    image fails alone, naming it."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.preprocess import ARMS, preprocess_repository
    from kiln.imaging import preprocess
    from kiln.paths import SAMPLE_IMAGES, list_images
    from tests.conftest import start_triton

    repo, transform = preprocess_repository(tmp_path / "repo", max_queue_delay_us=1_500_000)
    photos = [p.read_bytes() for p in list_images(SAMPLE_IMAGES)]
    requests = [photos[:2], [photos[2], BAD_IMAGES["corrupt bytes"][0]], photos[3:6]]
    server = start_triton(repo, tmp_path / "triton.log")
    try:
        model = ARMS["pool"]
        with ThreadPoolExecutor(len(requests)) as pool:
            calls = [pool.submit(_raw_infer, server, model, [("image", np.array([[p] for p in images], dtype=object),
                                                                   "BYTES")]) for images in requests]
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(call.result().as_numpy("pixel_values"))
                except InferenceServerException as exc:
                    outcomes.append(exc.message())
        stats = _model_stats(server, model, inferences=7)
    finally:
        server.stop()
    assert stats == {"inferences": 7, "executions": 1}, stats  # one call, three requests
    for images, outcome in zip(requests[::2], outcomes[::2]):
        np.testing.assert_array_equal(outcome, np.stack([preprocess(p, transform) for p in images]))
    assert isinstance(outcomes[1], str) and "corrupt or truncated image" in outcomes[1], outcomes[1]


def test_bench_preprocess_measures_the_pool_and_jpeg_draft_against_one_thread(tmp_path, kiln):
    code, out, err = kiln("bench", "preprocess", "--calls", "2", "--batch-sizes", "1,4", "--photo-sizes", "1024x768",
                          "--out", tmp_path)
    assert code == 0, err
    saved = json.loads((tmp_path / "preprocess.json").read_text())
    arms = ("pool", "one thread", "pool + JPEG draft", "torch decode")
    assert {(r["photos"], r["batch"], r["arm"]) for r in saved["rows"]} == {
        (photos, b, a) for photos in ("samples", "1024x768") for b in (1, 4) for a in arms}
    for row in saved["rows"]:  # the pool's pixels were compared with one thread's on every call (the run fails if not)
        assert row["images_per_s"] > 0 and row["vs_one_thread"] > 0
    drafted = {r["photos"]: r["pixels_psnr_db"] for r in saved["rows"] if r["arm"] == "pool + JPEG draft"}
    assert drafted["samples"] is None  # the samples are too small to decode reduced: the same pixels
    assert 38 < drafted["1024x768"] < 80  # decoded reduced: close to the exact pixels, not equal
    decoded = [r["pixels_psnr_db"] for r in saved["rows"] if r["arm"] == "torch decode"]
    assert all(35 < psnr < 80 for psnr in decoded), decoded  # torchvision and torch's resize: close to PIL's
    assert "| 1024x768 | 4 |" in out and (tmp_path / "preprocess.png").stat().st_size > 5_000
    assert saved["machine"]["isa"]
    assert kiln("bench", "preprocess", "--calls", "0", "--out", tmp_path)[0] == 2
    assert kiln("bench", "preprocess", "--batch-sizes", "64", "--out", tmp_path)[0] == 2
    assert kiln("bench", "preprocess", "--photo-sizes", "1024", "--out", tmp_path)[0] == 2
    code, _, err = kiln("bench", "preprocess", "--photo-sizes", "1024x8", "--out", tmp_path)
    assert code == 2 and "sides of at least 16" in err


def _living_group(pgid: int) -> set[int]:
    """The processes of a process group that still run (a zombie has ended; its parent has not reaped it yet)."""
    members = set()
    for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, IndexError, PermissionError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def test_stop_ends_what_a_killed_server_left_in_its_process_group():
    """A SIGKILLed tritonserver orphans its Python-backend stubs. Two such stubs (sd_tokenizer, from the replica and
    shared-queue tests, which kill a Triton under load) outlived a CI run by an hour. That hang could not be produced
    on demand (here, idle and busy stubs alike noticed their parent's death within 0.3 s), so this test orphans two
    `sleep`s of a real process group the same way, and checks that what TritonServer.stop() runs after the server
    exits (kiln.triton_server._kill_group) ends them."""
    import subprocess

    from kiln.triton_server import _kill_group

    leader = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)  # as Triton is
    deadline = time.monotonic() + 10
    while len(_living_group(leader.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait()
    orphans = _living_group(leader.pid)
    try:
        assert len(orphans) == 2, orphans  # the two sleeps, orphaned and running: what a killed Triton leaves
        _kill_group(leader.pid)
        deadline = time.monotonic() + 10
        while _living_group(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _living_group(leader.pid)
    finally:
        for pid in _living_group(leader.pid):
            os.kill(pid, signal.SIGKILL)
    _kill_group(leader.pid)  # an empty group is no error


def test_a_clients_many_images_run_on_its_kept_threads_at_most_concurrency_at_once():
    """ViTClient._map (the work of classify/embed for many images; no Triton needed: the work here is a function):
    results in the items' order, at most `concurrency` of a call in flight, on threads the client keeps between calls
    (each keeps its gRPC connection), an error raised to the caller, and a closed client says so."""
    import threading

    from kiln.errors import KilnError

    client = ViTClient("127.0.0.1:1", concurrency=3)
    lock, running, most, seen = threading.Lock(), [0], [0], set()

    def work(item: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            seen.add(threading.current_thread())
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return item * 2

    assert client._map(work, list(range(12))) == [i * 2 for i in range(12)]
    assert most[0] == 3 and all(t.name.startswith("kiln-vit") for t in seen) and len(seen) == 3
    first = set(seen)
    time.sleep(0.2)  # (its threads idle again)
    assert client._map(work, list(range(12))) == [i * 2 for i in range(12)]
    assert seen == first  # the same threads again
    assert client._map(work, [5]) == [10] and threading.current_thread() in seen  # one item: on the caller's thread

    def fails(item: int) -> int:
        raise ValueError(f"item {item}")

    with pytest.raises(ValueError, match="item 0"):
        client._map(fails, [0, 1])
    client.close()
    assert all(not t.is_alive() for t in first)
    with pytest.raises(KilnError, match="closed"):
        client._map(work, [1, 2])


def test_once_an_image_reaches_no_triton_the_calls_other_images_are_not_sent():
    """A Triton gone (here: nothing listens on the port) fails each image only after TritonClient waited for it to
    come back (RECONNECT_WAIT_S); the images not yet sent then fail at once, marked unreachable (the API's 503), instead
    of each waiting as long in waves of `concurrency`."""
    from kiln.triton_server import free_port

    client = ViTClient(f"127.0.0.1:{free_port()}", concurrency=3)
    try:
        for results in (client.classify([(f"i{n}", b"x") for n in range(10)]),
                        client.embed([(f"i{n}", b"x") for n in range(10)], layer=0)):
            assert [r.image for r in results] == [f"i{n}" for n in range(10)]
            assert all(r.unreachable and "cannot reach Triton" in r.error for r in results)
            sent = [r for r in results if not r.error.startswith("not sent: ")]
            assert 1 <= len(sent) <= 3 and results[0] in sent  # the first wave only (its runners' first images)
            assert all(r.as_dict() == {"image": r.image, "error": r.error} for r in results)
    finally:
        client.close()
