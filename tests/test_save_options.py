"""AUTOMATIC1111's saving and mask settings: save_txt (an infotext .txt beside each saved image and grid),
save_init_img (img2img's init images kept in outputs/init-images), and for inpainting save_mask,
save_mask_composite, return_mask and return_mask_composite (the mask the init image is pasted back by, and the image
cut out by it), over real HTTP against the session's Triton."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from kiln.imaging import PNG
from kiln.masks import doubled
from orchestrator.server.outputs import Outputs

SETTINGS = ("save_txt", "save_init_img", "save_mask", "save_mask_composite", "return_mask", "return_mask_composite")


def png(array: np.ndarray) -> str:
    return base64.b64encode(PNG.encode(array)).decode()


def opened(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_save_txt_writes_the_infotext_beside_the_image(tmp_path):
    info = {"prompt": "a cat", "seed": 7, "steps": 2}
    path = Outputs(tmp_path, txt=True).write(tmp_path / "00000-7.png", np.zeros((8, 8, 3), np.uint8), info)
    text = Image.open(path).info["parameters"]
    assert "Seed: 7" in text and path.with_suffix(".txt").read_text(encoding="utf-8") == text + "\n"
    plain = Outputs(tmp_path).write(tmp_path / "00001-7.png", np.zeros((8, 8, 3), np.uint8), info)
    assert not plain.with_suffix(".txt").exists()


def test_large_saved_images_get_a_jpeg_copy_as_export_for_4chan_makes_it(tmp_path):
    from kiln.imaging import ImageFormat
    from kiln.infotext import infotext_of

    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # (a PNG of about 9 KB)
    info = {"prompt": "a cat", "seed": 7}
    # over the size limit: a copy at full size, with the infotext
    path = Outputs(tmp_path, jpeg_copies=(0.005, 4000)).write(tmp_path / "00000-7.png", noise, info)
    with Image.open(path.with_suffix(".jpg")) as copy:
        assert copy.format == "JPEG" and copy.size == (64, 48) and "Seed: 7" in infotext_of(copy)
    # a side over the pixel limit: downscaled to it on the longer side
    path = Outputs(tmp_path, jpeg_copies=(100, 32)).write(tmp_path / "00001-7.png", noise, info)
    assert Image.open(path.with_suffix(".jpg")).size == (32, 24)
    # under both (the defaults: 4 MB, 4000 pixels), off, or a JPEG already: none
    for outputs, name in ((Outputs(tmp_path), "00002-7.png"), (Outputs(tmp_path, jpeg_copies=None), "00003-7.png"),
                          (Outputs(tmp_path, samples=ImageFormat("jpeg"), jpeg_copies=(0.001, 8)), "00004-7.jpeg")):
        outputs.write(tmp_path / name, noise, info)
        assert not (tmp_path / name).with_suffix(".jpg").exists()


def test_the_whole_picture_overlay_mask_is_the_soft_mask_doubled():
    soft = Image.fromarray(np.array([[0, 60, 127, 128, 200, 255]], np.uint8), "L")
    assert np.asarray(doubled(soft)).tolist() == [[0, 120, 254, 255, 255, 255]]


def test_a_grid_takes_pictures_of_another_size_as_automatic1111_pastes_them():
    from orchestrator.server.outputs import image_grid

    big, small = np.full((64, 64, 3), 200, np.uint8), np.full((32, 48, 3), 90, np.uint8)
    grid = image_grid([big, small, big.copy()[:48]], rows=1)  # (a skipped hires pass leaves its first pass's size)
    assert grid.shape == (64, 192, 3)
    assert (grid[:32, 64:112] == 90).all() and (grid[32:, 64:128] == 0).all() and (grid[:32, 112:128] == 0).all()
    assert (grid[:48, 128:] == 200).all() and (grid[48:, 128:] == 0).all()


@pytest.fixture(scope="module")
def api(own_api):
    return own_api


SMALL = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2, "seed": 7, "denoising_strength": 0.6}


@pytest.mark.slow
def test_saved_text_init_images_and_inpainting_masks(api):
    init = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:, :32] = 255  # the left half repaints
    inpaint = SMALL | {"init_images": [png(init)], "mask": png(mask), "mask_blur": 4, "batch_size": 2,
                       "save_images": True}
    with api.client() as client:
        try:
            assert client.post("/sdapi/v1/options", json=dict.fromkeys(SETTINGS, True)).is_success
            answer = client.post("/sdapi/v1/img2img", json=inpaint)
            assert answer.status_code == 200, answer.text
            grid, *images = [opened(b64) for b64 in answer.json()["images"]]
            # their grid, then each image, its mask and its composite, as AUTOMATIC1111 appends them; infotexts for
            # the grid and the images
            assert [image.mode for image in images] == ["RGB", "RGB", "RGBA"] * 2
            assert grid.size == (3 * 64, 2 * 64) and "parameters" in grid.info
            assert len(json.loads(answer.json()["info"])["infotexts"]) == 3
            assert "parameters" in images[0].info and "parameters" not in images[1].info
            # only masked (the API's default): the mask blurred by mask_blur (sigma 4), not doubled, grey on both
            # sides of the edge at x = 32
            returned_mask = np.asarray(images[1])[..., 0]
            assert (returned_mask[:, :16] == 255).all() and (returned_mask[:, 48:] == 0).all()
            assert (0 < returned_mask[:, 26]).all() and (returned_mask[:, 26] < 255).all()
            assert (0 < returned_mask[:, 36]).all() and (returned_mask[:, 36] < 255).all()
            composite, image = np.asarray(images[2]), np.asarray(images[0])
            assert np.array_equal(composite[..., 3], returned_mask)  # transparent where the init image stays
            opaque = composite[..., 3] == 255
            assert np.array_equal(composite[opaque][:, :3], image[opaque])
            # on the mask's blurred edge, the image before the init image was pasted over it (as there), which the
            # answer's image is blended from: image = init x (1 - a) + before x a
            alpha = returned_mask[..., None] / 255.0
            edge = (returned_mask > 96) & (returned_mask < 255)
            before_overlay = (image - init * (1 - alpha)) / np.maximum(alpha, 1e-3)
            assert np.abs(composite[..., :3][edge] - before_overlay[edge]).max() <= 8
            assert np.abs(composite[..., :3][edge].astype(int) - image[edge]).max() > 20
            assert np.array_equal(image[:, 48:], init[:, 48:])  # (outside the mask: the init image pasted back)

            # the whole picture: doubled (a pixel blurred half-way in or further is repainted whole)
            whole = inpaint | {"inpaint_full_res": False, "save_images": False, "batch_size": 1}
            answer = client.post("/sdapi/v1/img2img", json=whole)
            assert answer.status_code == 200, answer.text
            whole_mask = np.asarray(opened(answer.json()["images"][1]))[..., 0]
            assert (whole_mask[:, :32] == 255).all() and (whole_mask[:, 48:] == 0).all()
            assert np.array_equal(whole_mask, np.clip(2 * returned_mask.astype(int), 0, 255))  # (the same blur)

            # the saved files: each image, its mask and composite numbered on, each with its .txt
            day = next((api.outputs / "img2img-images").iterdir())
            names = sorted(path.name for path in day.iterdir())
            stems = ["00000-7", "00001-7-mask", "00002-7-mask-composite", "00003-8", "00004-8-mask",
                     "00005-8-mask-composite"]
            assert names == sorted(f"{stem}.{ext}" for stem in stems for ext in ("png", "txt"))
            text = Image.open(day / "00000-7.png").info["parameters"]
            assert (day / "00000-7.txt").read_text(encoding="utf-8") == text + "\n" and "Seed: 7" in text
            assert np.array_equal(np.asarray(Image.open(day / "00001-7-mask.png"))[..., 0], returned_mask)
            assert Image.open(day / "00002-7-mask-composite.png").mode == "RGBA"
            grid_day = next((api.outputs / "img2img-grids").iterdir())
            grid = Image.open(next(grid_day.glob("grid-*.png")))
            assert grid.size == (3 * 64, 2 * 64)  # the answer's six pictures, round(sqrt(6)) rows
            assert next(grid_day.glob("grid-*.txt")).read_text(encoding="utf-8").startswith("a photo of a cat")
            # the init image kept by the md5 of its pixels (once, though two images were made of it)
            kept = list((api.outputs / "init-images").iterdir())
            assert [path.name for path in kept] == [f"{hashlib.md5(init.tobytes()).hexdigest()}.png"]
            assert np.array_equal(np.asarray(Image.open(kept[0]).convert("RGB")), init)

            # asked where there is no mask, or of a script's answer, or of another type: refused by name
            refused = client.post("/sdapi/v1/txt2img", json=SMALL | {"override_settings": {"return_mask": True}})
            assert refused.status_code == 422 and "return_mask" in refused.text
            # a script's answer: no mask pictures where the options ask for them, a 422 where the request does
            matrix = inpaint | {"prompt": "a cat|red", "script_name": "prompt matrix", "save_images": False,
                                "script_args": [False, False, "positive", "comma", 0], "batch_size": 1}
            answer = client.post("/sdapi/v1/img2img", json=matrix)
            assert answer.status_code == 200 and {opened(b64).mode for b64 in answer.json()["images"]} == {"RGB"}
            refused = client.post("/sdapi/v1/img2img", json=matrix | {"override_settings": {"return_mask": True}})
            assert refused.status_code == 422 and "return_mask" in refused.text
            unsaved = inpaint | {"save_images": False, "override_settings": {"save_mask": True}}
            refused = client.post("/sdapi/v1/img2img", json=unsaved)
            assert refused.status_code == 422 and "save_mask" in refused.text
            refused = client.post("/sdapi/v1/options", json={"save_txt": "yes"})
            assert refused.status_code == 422 and "save_txt" in refused.text
            # return_grid off: the loopback's grid saved, not answered; sent where no grid is made: a 422
            loopback = SMALL | {"init_images": [png(init)], "script_name": "loopback", "save_images": True,
                                "script_args": [2, 0.3, "Linear", "None"]}
            answer = client.post("/sdapi/v1/img2img", json=loopback)
            assert answer.status_code == 200 and len(answer.json()["images"]) == 3, answer.text  # the grid, 2 loops
            answer = client.post("/sdapi/v1/img2img", json=loopback | {"override_settings": {"return_grid": False}})
            assert answer.status_code == 200 and len(answer.json()["images"]) == 2, answer.text
            assert len(json.loads(answer.json()["info"])["infotexts"]) == 2
            mk2 = loopback | {"script_name": "outpainting_mk_2", "override_settings": {"return_grid": False},
                              "width": 128, "script_args": [None, 32, 2, ["right"]]}  # (by another of its names)
            grown = client.post("/sdapi/v1/img2img", json=mk2)
            assert grown.status_code == 200, grown.text
            refused = client.post("/sdapi/v1/txt2img", json=SMALL | {"override_settings": {"return_grid": False}})
            assert refused.status_code == 422 and "return_grid" in refused.text
            # the settings off: the answer has the images alone
            off = SMALL | {"init_images": [png(init)], "mask": png(mask),
                           "override_settings": dict.fromkeys(SETTINGS, False)}
            plain = client.post("/sdapi/v1/img2img", json=off)
            assert plain.status_code == 200 and len(plain.json()["images"]) == 1
        finally:
            client.post("/sdapi/v1/options", json=dict.fromkeys(SETTINGS, False))


def new_files(folder, before: set) -> list[str]:
    """The images (not grids) saved since `before` was listed."""
    return sorted(path.name for path in folder.glob("*-images/*/*.png") if path not in before)


@pytest.mark.slow
def test_images_saved_before_the_hires_fix_and_before_colour_correction(api):
    with api.client() as client:
        seen = set(api.outputs.glob("*-images/*/*.png"))
        # the hires fix's first pass, as txt2img without it makes the same images: a batch's first passes, then
        # its images, as AUTOMATIC1111 numbers them
        plain = client.post("/sdapi/v1/txt2img", json=SMALL | {"batch_size": 2, "save_images": False})
        assert plain.status_code == 200, plain.text
        hires = SMALL | {"batch_size": 2, "save_images": True, "enable_hr": True, "hr_scale": 2,
                         "hr_upscaler": "Latent", "override_settings": {"save_images_before_highres_fix": True}}
        answer = client.post("/sdapi/v1/txt2img", json=hires)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["images"]) == 3  # their grid and the two images (the first passes: saved only)
        made = new_files(api.outputs, seen)
        assert [name.split("-", 1)[1] for name in made] == ["7-before-highres-fix.png", "8-before-highres-fix.png",
                                                           "7.png", "8.png"]
        day = next((api.outputs / "txt2img-images").iterdir())
        for b64, name in zip(plain.json()["images"], made[:2]):
            first_pass = np.asarray(Image.open(day / name))
            assert first_pass.shape == (64, 64, 3) and np.array_equal(first_pass, np.asarray(opened(b64)))
        assert Image.open(day / made[2]).size == (128, 128)

        # img2img's colour correction: the image before it (with the overlay), as the same request without it makes
        init = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        init[:, :, 0] = 250  # (a strong cast for the correction to move the colours towards)
        img2img = SMALL | {"init_images": [png(init)], "save_images": True}
        seen = set(api.outputs.glob("*-images/*/*.png"))
        uncorrected = client.post("/sdapi/v1/img2img", json=img2img | {"save_images": False})
        corrected = client.post("/sdapi/v1/img2img", json=img2img | {"override_settings": {
            "img2img_color_correction": True, "save_images_before_color_correction": True}})
        assert uncorrected.status_code == 200 and corrected.status_code == 200, corrected.text
        made = new_files(api.outputs, seen)
        assert [name.split("-", 1)[1] for name in made] == ["7-before-color-correction.png", "7.png"]
        day = next((api.outputs / "img2img-images").iterdir())
        before = np.asarray(Image.open(day / made[0]))
        assert np.array_equal(before, np.asarray(opened(uncorrected.json()["images"][0])))
        assert np.array_equal(np.asarray(Image.open(day / made[1])), np.asarray(opened(corrected.json()["images"][0])))
        assert not np.array_equal(before, np.asarray(Image.open(day / made[1])))

        # asked where the step does not run, or where nothing is saved: refused by name
        for body, key in ((SMALL | {"save_images": True}, "save_images_before_highres_fix"),
                          (hires | {"save_images": False}, "save_images_before_highres_fix"),
                          (img2img, "save_images_before_color_correction")):
            url = "/sdapi/v1/img2img" if "init_images" in body else "/sdapi/v1/txt2img"
            refused = client.post(url, json=body | {"override_settings": {key: True}})
            assert refused.status_code == 422 and key in refused.text, refused.text


def test_a_saving_jobs_pictures_are_encoded_once_for_its_files_and_its_answer():
    from kiln.imaging import ImageFormat
    from orchestrator.server.outputs import Encoded

    calls = []

    class Counted(ImageFormat):  # the real encoder, counted
        def encode(self, image, text=None):
            calls.append(self.name)
            return super().encode(image, text)

    png_, jpeg = Counted("png"), Counted("jpg")
    picture = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    memo, text = Encoded(), {"parameters": "a cat, Seed: 7"}
    first = memo(png_, picture, text)
    assert memo(png_, picture.copy(), dict(text)) is first  # the same pixels (another array: a grid made again)
    assert calls == ["png"] and len(memo) == 1
    assert first == PNG.encode(picture, text)  # the bytes an encoding of its own makes
    memo(png_, picture, {"parameters": "another"})  # another text, encoding or picture: encoded anew
    memo(jpeg, picture, text)
    memo(png_, picture[::-1].copy(), text)
    assert calls == ["png", "png", "jpg", "png"] and len(memo) == 4
    memo.close()  # the answer is made: nothing kept from now on, and it still encodes
    assert len(memo) == 0 and memo(png_, picture, text) == first and len(memo) == 0


def test_images_are_saved_off_the_engines_workers_before_the_answer_and_encoded_once(api, monkeypatch):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import kiln.imaging
    from orchestrator.server import generation

    # the real save, held until the test lets it go, its thread seen; the real PNG encoder, counted
    gate, threads, encodes, real_save, real_png = threading.Event(), [], [], generation.save_job_images, \
        kiln.imaging.encode_png

    def held(*args, **kwargs):
        threads.append(threading.current_thread().name)
        assert gate.wait(60)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(generation, "save_job_images", held)
    monkeypatch.setattr(kiln.imaging, "encode_png", lambda *args: encodes.append(1) or real_png(*args))
    before, queue = set(api.outputs.glob("*-*/*/*.png")), api.app.state.engine.queue
    with api.client() as client, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, "/sdapi/v1/txt2img", json=SMALL | {"batch_size": 2, "save_images": True})
        deadline = time.monotonic() + 60
        while not threads:  # the job is done, its save started (on a saving thread: the worker took its next job)
            assert time.monotonic() < deadline and not answer.done(), answer.result().text
            time.sleep(0.02)
        job = max(queue.jobs(), key=lambda job: job.created)
        assert job.status.value == "done" and threads[0].startswith("kiln-save") and not queue.running()
        time.sleep(0.5)
        assert not answer.done()  # the answer waits for the files
        # /sdapi/v1/progress still shows it (AUTOMATIC1111 writes its files inside the job), done with its steps
        shown = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        assert shown["state"]["job"] == f"task({job.id})" and shown["state"]["job_count"] == 1, shown
        assert shown["progress"] == 1.0 and shown["eta_relative"] == 0
        gate.set()
        answer = answer.result(60)
        assert answer.status_code == 200, answer.text
        assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""  # and no more once they are written
        # each picture (the grid first) the file's very bytes, encoded once: 2 images and the grid
        written = sorted(set(api.outputs.glob("*-*/*/*.png")) - before, key=lambda p: ("grids" not in str(p), p))
        assert [base64.b64decode(b64) for b64 in answer.json()["images"]] == [p.read_bytes() for p in written]
        assert len(written) == 3 and len(encodes) == 3 and len(job.context["encoded"]) == 0  # (nothing kept)
        # a task: running until its files are written (GET /v1/tasks/{id} waits for them where it is done)
        gate.clear()
        task = client.post("/v1/tasks/txt2img", json=SMALL | {"seed": 30, "save_images": True}).json()["id"]
        while len(threads) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert max(queue.jobs(), key=lambda job: job.created).status.value == "done"
        assert client.get("/v1/tasks").json()["tasks"][0]["status"] == "running"  # (while its files are written)
        for refused in (client.delete(f"/v1/tasks/{task}"), client.post(f"/v1/tasks/{task}/skip")):
            assert refused.status_code == 409 and "its images are being written" in refused.json()["detail"]
        state = pool.submit(client.get, f"/v1/tasks/{task}")
        time.sleep(0.3)
        assert not state.done()
        gate.set()
        state = state.result(60).json()
        saved = list(api.outputs.glob("txt2img-images/*/*-30.png"))
        assert state["status"] == "done" and len(saved) == 1
        assert base64.b64decode(state["result"]["images"][0]) == saved[0].read_bytes()


def test_pictures_are_encoded_side_by_side_as_each_alone_and_an_encodings_error_is_raised():
    import threading

    from kiln.errors import InputError
    from kiln.imaging import ImageFormat
    from orchestrator.server.outputs import encoded

    rng, threads = np.random.default_rng(1), set()

    class Seen(ImageFormat):  # the real encoder, its threads seen
        def encode(self, image, text=None):
            threads.add(threading.current_thread().name)
            return super().encode(image, text)

    pictures = [(Seen(name), rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), {"parameters": f"Seed: {i}"})
                for i, name in enumerate(("png", "jpg", "webp", "png"))]
    assert encoded(pictures) == [ImageFormat(how.name).encode(picture, text) for how, picture, text in pictures]
    assert threads and all(name.startswith("kiln-encode") for name in threads)
    with pytest.raises(InputError, match="WebP"):  # (one picture's error, as its encoding raises it)
        encoded(pictures[:1] + [(ImageFormat("webp"), np.zeros((1, 16384, 3), np.uint8), None)])


def test_a_picture_its_format_cannot_hold_leaves_the_others_saved(tmp_path, caplog):
    from kiln.imaging import ImageFormat
    from orchestrator.jobs import Job, Status
    from orchestrator.pipeline import Txt2ImgRequest
    from orchestrator.server.outputs import save_job_images

    # two images 9000 pixels wide, their grid 18000: over WebP's 16383 a side
    images = [np.full((8, 9000, 3), shade, np.uint8) for shade in (40, 200)]
    job = Job(kind="txt2img", request=Txt2ImgRequest(prompt="a cat", batch_size=2), status=Status.DONE,
              images=images, infos=[{"prompt": "a cat", "seed": 7 + i} for i in range(2)], context={})
    webp = ImageFormat("webp")
    with caplog.at_level("ERROR", logger="kiln.api"):
        paths = save_job_images(job, Outputs(tmp_path, samples=webp, grids=webp))
    assert [path.name for path in paths] == ["00000-7.webp", "00001-8.webp"]
    assert not list(tmp_path.glob("txt2img-grids/*/*")) and "its grid" in caplog.text and "WebP" in caplog.text


def test_a_large_init_image_kept_by_save_init_img_gets_its_jpeg_copy(tmp_path):
    from orchestrator.server.outputs import save_init_image

    noise = np.random.default_rng(2).integers(0, 256, (48, 64, 4), dtype=np.uint8)  # (RGBA, as sent)
    data = PNG.encode(noise, {"parameters": "a cat\nSteps: 2, Seed: 7"})
    path = save_init_image(data, Outputs(tmp_path, init_images=True, jpeg_copies=(100, 32)))  # over 32 pixels a side
    with Image.open(path.with_suffix(".jpg")) as copy:
        assert copy.format == "JPEG" and copy.mode == "RGB" and copy.size == (32, 24)
    assert Image.open(path).mode == "RGBA"  # the kept image itself as sent
    other = save_init_image(PNG.encode(noise[..., :3]), Outputs(tmp_path, init_images=True))  # under the defaults
    assert other.exists() and not other.with_suffix(".jpg").exists()
