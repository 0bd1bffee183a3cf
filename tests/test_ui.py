"""The web page in a real browser (Debian's Chromium driven by Playwright) against the real API on the session's
Triton (tiny SD + ViT): a person's session, tab by tab, with a screenshot of each in out/ui/.

The page is a client of the public API only, so what it shows is checked against the API's own answers. The
service runs one worker here so that tasks really queue (positions, cancelling a queued one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests

from kiln.triton_server import free_port
from orchestrator.security import SecurityOptions
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import decode

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "out" / "ui"
PHOTO = ROOT / "assets" / "images" / "chelsea.jpg"


@pytest.fixture(scope="module")
def service(triton, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), workers=1, outputs_dir=outputs))
    yield live
    live.stop()


def open_page(browser, url: str, **context):
    page = browser.new_context(viewport={"width": 1280, "height": 900}, **context).new_page()
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    page.wait_for_function("document.querySelector('[name=sampler_name]').options.length > 0")
    return page


def settle(page, text: str, timeout: float = 120_000) -> None:
    page.wait_for_function(f"document.querySelector('#progress-text').textContent.includes({json.dumps(text)})",
                           timeout=timeout)


def generate(page, button: str = "#submit") -> str:
    """Click Generate (or `button`); the new task's id once its images are shown."""
    before = page.evaluate("window.kiln.tasks.size")
    page.click(button)
    page.wait_for_function("n => window.kiln.tasks.size > n", arg=before)
    task = page.evaluate("[...window.kiln.tasks.keys()].at(-1)")
    page.wait_for_function("id => window.kiln.shown === id", arg=task, timeout=120_000)
    return task


def shot(page, name: str) -> None:
    page.wait_for_timeout(300)  # the progress bar's transition
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _infotext_png(path: Path, sampler: str = "Sampler: DPM++ 2M, Schedule type: Karras") -> Path:
    """A PNG as AUTOMATIC1111 writes one: its infotext in the "parameters" text chunk."""
    from PIL import Image, PngImagePlugin

    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", f"a red fox\nNegative prompt: blurry\nSteps: 7, {sampler}, CFG scale: 5.5, "
                                 "Seed: 99, Size: 64x64, Variation seed: 4, Variation seed strength: 0.2")
    Image.new("RGB", (64, 64), (180, 90, 40)).save(path, pnginfo=chunk)
    return path


def test_a_session_in_the_browser(browser, service, tmp_path):
    page = open_page(browser, service.url)
    served = requests.get(f"{service.url}/sdapi/v1/sd-models", timeout=30).json()[0]["title"]
    assert page.inner_text("#checkpoint") == served

    # txt2img: the progress bar moves, the preview changes as it denoises, the image arrives.
    page.evaluate("""() => {
        window.seen = {widths: new Set(), previews: new Set()};
        new MutationObserver(() => {
            window.seen.widths.add(document.querySelector('#progress-bar').style.width);
            const preview = document.querySelector('#preview');
            if (!preview.hidden) window.seen.previews.add(preview.src);
        }).observe(document.querySelector('#output'), {subtree: true, attributes: true});
    }""")
    page.fill("[name=prompt]", "a photo of a cat")
    for name, value in (("width", "64"), ("height", "64"), ("steps", "16"), ("seed", "1234")):
        page.fill(f"[name={name}]", value)
    generate(page)
    assert page.evaluate("window.seen.widths.size") >= 4  # 0%, steps between, 100%
    assert page.evaluate("window.seen.previews.size") >= 3
    assert page.evaluate("window.kiln.events.filter(e => e.event === 'progress').length") == 16
    assert "Seed: 1234" in page.inner_text("#info") and "Size: 64x64" in page.inner_text("#info")
    shot(page, "txt2img")

    # The seed's extras: a variation seed and a seed resized from a smaller size reach the image's infotext.
    page.click("#seed-extra summary")
    extras = {"subseed": "3", "subseed_strength": "0.5", "seed_resize_from_w": "48", "seed_resize_from_h": "48"}
    plain = {"subseed": "-1", "subseed_strength": "0", "seed_resize_from_w": "0", "seed_resize_from_h": "0"}
    for name, value in extras.items():
        page.fill(f"[name={name}]", value)
    page.select_option("[name=randn_source]", "NV")  # AUTOMATIC1111's NV random numbers
    page.fill("[name=steps]", "4")
    generate(page)
    assert "Variation seed: 3, Variation seed strength: 0.5, Seed resize from: 48x48, RNG: NV" in \
        page.inner_text("#info")
    page.select_option("[name=randn_source]", "CPU")
    for name, value in plain.items():
        page.fill(f"[name={name}]", value)

    # The gallery lists what save_images wrote; its parameters go back into the form.
    page.fill("[name=prompt]", "")
    page.click("[data-tab=gallery]")
    page.wait_for_selector("#gallery-grid img")
    page.click("#gallery-grid img >> nth=0")
    assert "a photo of a cat" in page.inner_text("#detail-parameters")
    assert page.get_attribute("#download", "href").startswith("/v1/outputs/file/txt2img-images/")
    shot(page, "gallery")
    page.click("#send-txt2img")
    assert page.input_value("[name=prompt]") == "a photo of a cat" and page.input_value("[name=seed]") == "1234"
    assert all(page.input_value(f"[name={name}]") == value for name, value in extras.items())  # the newest's
    assert page.input_value("[name=randn_source]") == "NV"
    for name, value in plain.items():
        page.fill(f"[name={name}]", value)

    # The hires fix: its settings reach the infotext; "Hires fix this image" redraws the shown image with its seed,
    # running the hires pass alone (AUTOMATIC1111's Upscale button: firstpass_image).
    page.click("#hires summary")
    page.check("[name=enable_hr]")
    page.select_option("[name=hr_upscaler]", "Lanczos")
    for name, value in (("hr_scale", "1.5"), ("hr_second_pass_steps", "2"), ("steps", "3"), ("seed", "-1")):
        page.fill(f"[name={name}]", value)
    generate(page)
    info = page.inner_text("#info")
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in info, info
    size = "[document.querySelector('#results img').naturalWidth, document.querySelector('#results img').naturalHeight]"
    assert page.evaluate(size) == [96, 96]
    page.uncheck("[name=enable_hr]")
    assert page.is_visible("#hires-this")
    generate(page)
    seed = page.evaluate("window.kiln.result.info.seed")
    assert page.evaluate(size) == [64, 64] and f"Seed: {seed}," in page.inner_text("#info")
    task = generate(page, "#hires-this")
    steps = page.evaluate("id => window.kiln.events.filter(e => e.task === id && e.event === 'progress').length", task)
    info = page.inner_text("#info")
    assert steps == 2 and page.evaluate(size) == [96, 96] and f"Seed: {seed}," in info and "Hires upscale: 1.5" in info
    shot(page, "hires")
    hired = page.evaluate("window.kiln.result.images[0]")
    # The gallery's "Hires fix" on the saved first pass (the newest but one, after the hires result): its parameters
    # back in the form, its seed and size, the form's hires settings: the same pixels.
    page.fill("[name=seed]", "7")
    page.click("[data-tab=gallery]")
    page.wait_for_selector("#gallery-grid img >> nth=1")
    page.click("#gallery-grid img >> nth=1")
    assert page.is_visible("#detail-hires") and f"Seed: {seed}," in page.inner_text("#detail-parameters")
    generate(page, "#detail-hires")
    assert page.input_value("[name=seed]") == str(seed)  # the form holds the saved image's parameters
    assert np.array_equal(decode(page.evaluate("window.kiln.result.images[0]"))[0], decode(hired)[0])
    page.fill("[name=seed]", "1234")

    # img2img: an image, a mask painted on it, inpainting.
    page.click("[data-tab=img2img]")
    assert not page.is_visible("#image-cfg-field")  # an instruct-pix2pix checkpoint's (test_instruct_pix2pix)
    page.set_input_files("#init-file", str(PHOTO))
    page.wait_for_function("document.querySelector('#mask-canvas').width > 0")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    assert page.evaluate("window.kiln.maskPainted")
    page.fill("[name=steps]", "8")
    generate(page)
    info = page.inner_text("#info")
    assert "Mask blur: 4" in info and "Denoising strength: 0.75" in info  # the mask reached the server
    shot(page, "img2img")
    page.click("#soft-inpainting summary")  # AUTOMATIC1111's soft inpainting, its script's args
    page.check("[name=soft_inpainting]")
    page.fill("[name=soft_difference_threshold]", "1.25")
    generate(page)
    info = page.inner_text("#info")
    assert "Soft inpainting enabled: True" in info and "Soft inpainting difference threshold: 1.25" in info
    page.uncheck("[name=soft_inpainting]")
    # A ControlNet inpaint unit without an image: it takes the init image and the painted mask (img2img's only).
    opened = page.evaluate("document.querySelector('#controlnet').open")
    page.evaluate("document.querySelector('#controlnet').open = true")
    page.click("#add-unit")
    page.select_option("#units .unit-module", "inpaint")
    page.fill("[name=steps]", "4")
    generate(page)
    assert "ControlNet 0: \"Module: inpaint," in page.inner_text("#info")
    assert page.locator("#results img").count() == 2  # the image, and the unit's map (the mask shown on it)
    page.click("#units .remove-unit")
    page.evaluate(f"document.querySelector('#controlnet').open = {str(opened).lower()}")
    # AUTOMATIC1111's Loopback (img2img only): two loops, their grid first, the strength moving to the final one.
    page.click("#loopback summary")
    page.check("[name=loopback]")
    page.fill("#loopback-loops", "2")
    page.fill("#loopback-final", "0.4")
    page.fill("[name=steps]", "4")
    page.click("#submit")
    settle(page, "Loopback done")
    assert page.locator("#results img").count() == 1 + 2
    page.click("#results img >> nth=2")
    assert "Denoising strength: 0.4, Final denoising strength: 0.4, Denoising curve: Linear" in page.inner_text("#info")
    page.uncheck("[name=loopback]")
    # AUTOMATIC1111's colour correction (an override setting; it writes no infotext, as there)
    page.check("[name=color_correction]")
    assert page.evaluate("generationBody('img2img')")["override_settings"]["img2img_color_correction"] is True
    generate(page)
    assert "Denoising strength" in page.inner_text("#info")
    page.uncheck("[name=color_correction]")
    assert "img2img_color_correction" not in page.evaluate("generationBody('img2img')")["override_settings"]
    # Poor man's outpainting (img2img only): the photo grown on every side is too many 64x64 tiles, which the server
    # says (the painted mask is not sent: the script makes its own).
    page.click("#outpainting summary")
    page.check("[name=outpainting]")
    page.fill("#outpaint-pixels", "32")
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert re.search(r"poor man's outpainting: \d+ tiles of 64x64; at most 64", page.inner_text("#form-error"))
    assert [e for e in page.errors if "422" in e] == page.errors != []  # the refusal, and nothing else
    page.errors.clear()
    # Outpainting mk2: its own settings; the photo (451x300) grown right by 61 (to 512) in a pass 64 wide leaves no
    # room for the blur, which the server says before any pass runs (the page's arguments parsed: they reached it)
    page.select_option("#outpaint-method", "mk2")
    assert page.is_visible("#outpaint-noise-q") and page.is_hidden("#outpaint-fill")
    page.fill("#outpaint-variation", "0.2")
    for side in ("left", "up", "down"):
        page.uncheck(f"#outpaint-directions input[value={side}]")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#form-error').innerText.includes('mk2')")
    assert "the pass growing right grows the image by 61 pixels but generates 64" in page.inner_text("#form-error")
    assert [e for e in page.errors if "422" in e] == page.errors != []
    page.errors.clear()
    page.select_option("#outpaint-method", "poor")
    assert page.is_hidden("#outpaint-noise-q") and page.is_visible("#outpaint-fill")
    page.uncheck("[name=outpainting]")
    page.click("[data-tab=txt2img]")
    assert page.is_hidden("#loopback")  # img2img's only

    # ControlNet: a unit with its image and module, in txt2img.
    page.click("[data-tab=txt2img]")
    page.click("#controlnet summary")
    page.click("#add-unit")
    assert page.is_disabled("#units .unit-resize")  # it fits the unit's own image only
    page.set_input_files("#units .unit-image", str(PHOTO))
    assert page.is_enabled("#units .unit-resize")
    page.select_option("#units .unit-module", "canny")  # its sliders, from /controlnet/module_list
    assert page.eval_on_selector_all("#units .unit-slider", "s => s.map(i => [i.dataset.field, i.value])") == [
        ["processor_res", "512"], ["threshold_a", "100"], ["threshold_b", "200"]]
    page.fill("#units .unit-slider[data-field=threshold_a]", "60")
    page.fill("#units .unit-weight", "0.8")
    page.select_option("#units .unit-control-mode", "ControlNet is more important")
    assert page.input_value("#units .unit-resize") == "Crop and Resize"  # the extension's default
    page.select_option("#units .unit-resize", "Resize and Fill")
    page.fill("[name=steps]", "4")
    generate(page)
    info = page.inner_text("#info")
    assert "ControlNet 0: \"Module: canny" in info and "Control Mode: ControlNet is more important" in info
    assert "Threshold A: 60" in info and "Resize Mode: Resize and Fill" in info
    shot(page, "controlnet")
    # the unit's detected map, after the image: no infotext of its own, and no "Hires fix this image" (it has no seed)
    assert page.locator("#results img").count() == 2 and page.is_visible("#hires-this")
    page.click("#results img >> nth=1")
    assert page.inner_text("#info") == "" and not page.is_visible("#hires-this")
    page.click("#results img >> nth=0")
    assert "ControlNet 0:" in page.inner_text("#info") and page.is_visible("#hires-this")
    page.click("#units .remove-unit")

    # Three tasks queued (one worker), the middle one cancelled, the last interrupted (AUTOMATIC1111's Interrupt:
    # done with what it had made, here before or while it ran): the first finishes, nothing else is lost.
    page.click("[data-tab=txt2img]")
    page.fill("[name=steps]", "80")
    for _ in range(3):
        before = page.evaluate("window.kiln.tasks.size")
        page.click("#submit")
        page.wait_for_function("n => window.kiln.tasks.size > n", arg=before)
    ids = page.evaluate("[...window.kiln.tasks.keys()].slice(-3)")
    page.wait_for_selector(f"li[data-task='{ids[1]}'] .cancel")
    # The queued task's Cancel button is the same element while the running one's progress events arrive (a list
    # rebuilt on each event loses clicks: press and release land on two different buttons).
    cancel = f"li[data-task='{ids[1]}'] .cancel"
    page.evaluate("selector => { window.heldCancel = document.querySelector(selector); }", cancel)
    seen = page.evaluate("window.kiln.events.length")
    page.wait_for_function("n => window.kiln.events.length >= n + 3", arg=seen)
    assert page.evaluate("selector => window.heldCancel === document.querySelector(selector)", cancel)
    page.click(cancel)
    assert page.is_hidden(f"li[data-task='{ids[2]}'] .skip")  # (skip ends a running image: not shown while queued)
    page.click(f"li[data-task='{ids[2]}'] .interrupt")
    page.wait_for_function("ids => ids.every(id => window.kiln.tasks.get(id).finished)", arg=ids, timeout=180_000)
    states = [requests.get(f"{service.url}/v1/tasks/{task}", timeout=30).json() for task in ids]
    assert [state["status"] for state in states] == ["done", "cancelled", "done"]
    assert [state["interrupted"] for state in states] == [False, False, True]
    assert states[0]["steps"] == 80
    page.wait_for_selector(f"li.task.cancelled[data-task='{ids[1]}']")
    shot(page, "queue")

    # A 2x2 X/Y/Z plot: seeds across, steps down; the grid with its labels, each cell a task.
    page.click("[data-tab=xyz]")
    page.select_option(".axis[data-axis=x] .axis-type", "Seed")
    page.fill(".axis[data-axis=x] .axis-values", "1, 2")
    page.select_option(".axis[data-axis=y] .axis-type", "Steps")
    page.fill(".axis[data-axis=y] .axis-values", "4, 8")
    page.fill("[name=seed]", "-1")
    page.click("#submit")
    settle(page, "X/Y/Z plot done")
    size = page.evaluate("[document.querySelector('#results img').naturalWidth, "
                         "document.querySelector('#results img').naturalHeight]")
    assert size[0] > 2 * 64 and size[1] > 2 * 64  # two cells each way, plus the labels' margins
    assert 'X Type: Seed, X Values: "1, 2", Y Type: Steps' in page.inner_text("#info")
    shot(page, "xyz")

    # A prompt matrix in txt2img: two variable parts, four images and their grid first.
    page.click("[data-tab=txt2img]")
    page.fill("[name=prompt]", "a photo of a cat|red|at night")
    page.fill("[name=steps]", "4")
    page.click("#prompt-matrix summary")
    page.check("[name=prompt_matrix]")
    page.click("#submit")
    settle(page, "Prompt matrix done")
    assert page.locator("#results img").count() == 1 + 4
    page.click("#results img >> nth=4")
    assert page.inner_text("#info").startswith("a photo of a cat, red, at night")
    page.uncheck("[name=prompt_matrix]")
    shot(page, "prompt-matrix")
    # Prompts from file or textbox: a line each, its options over the form's; with the matrix too, one is asked for.
    page.click("#prompts-from-file summary")
    page.check("[name=prompts_from_file]")
    page.fill("#lines-text", "red\n--prompt at night --steps 2 --seed 5")
    page.select_option("#lines-position", "end")
    page.check("[name=prompt_matrix]")
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "choose one script" in page.inner_text("#form-error")
    page.uncheck("[name=prompt_matrix]")
    page.click("#submit")
    settle(page, "Prompts from file done")
    assert page.locator("#results img").count() == 2
    page.click("#results img >> nth=1")
    info = page.inner_text("#info")
    assert info.startswith("a photo of a cat|red|at night at night") and "Steps: 2" in info and "Seed: 5," in info
    page.uncheck("[name=prompts_from_file]")

    # Classify: an image in, its top labels out.
    page.click("[data-tab=classify]")
    page.set_input_files("#classify-files", str(PHOTO))
    page.wait_for_selector(".classification .score")
    assert page.locator(".classification .score").count() == 5
    shot(page, "classify")

    # A phone-sized screen: one column, nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.click("[data-tab=txt2img]")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.click("[data-tab=settings]")
    page.wait_for_selector("#options-form input[name=CLIP_stop_at_last_layers]")
    shot(page, "settings")
    assert not page.errors, page.errors

    # PNG info: another program's PNG read by the server (png-info), its fields sent into the txt2img form.
    page.click("[data-tab=png-info]")
    page.set_input_files("#png-file", str(_infotext_png(tmp_path / "a1111.png")))
    page.wait_for_selector("#png-detail:not([hidden])")
    assert page.inner_text("#png-parameters").startswith("a red fox\nNegative prompt: blurry\nSteps: 7")
    shot(page, "png-info")
    page.click("#png-send-txt2img")
    form = {"prompt": "a red fox", "negative_prompt": "blurry", "steps": "7", "cfg_scale": "5.5", "seed": "99",
            "width": "64", "height": "64", "subseed": "4", "subseed_strength": "0.2"}
    assert {name: page.input_value(f"[name={name}]") for name in form} == form
    assert (page.input_value("[name=sampler_name]"), page.input_value("[name=scheduler]")) == ("DPM++ 2M", "karras")
    assert page.input_value("[name=randn_source]") == "GPU"  # no RNG in it: AUTOMATIC1111's default
    page.click("[data-tab=png-info]")  # kiln's (and AUTOMATIC1111's before 1.9) sampler on a type: one name
    page.set_input_files("#png-file", str(_infotext_png(tmp_path / "kiln.png", "Sampler: Euler a Karras")))
    page.wait_for_function("document.querySelector('#png-parameters').textContent.includes('Euler a Karras')")
    page.click("#png-send-txt2img")
    assert (page.input_value("[name=sampler_name]"), page.input_value("[name=scheduler]")) == ("Euler a", "karras")
    page.click("[data-tab=png-info]")
    page.set_input_files("#png-file", str(PHOTO))  # a photo: nothing to send
    page.wait_for_function("document.querySelector('#png-parameters').textContent.includes('no parameters')")
    assert page.is_disabled("#png-send-txt2img")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    page.set_input_files("#png-file", str(tmp_path / "broken.png"))  # the server's message, shown
    page.wait_for_selector("#png-error:not([hidden])")
    assert "not an image this server reads" in page.inner_text("#png-error") and page.is_hidden("#png-detail")

    # Bad input: the API's message next to the field; a task queued before it still finishes.
    page.click("[data-tab=txt2img]")
    page.fill("[name=steps]", "20")
    page.fill("[name=width]", "64")
    page.click("#submit")
    queued = page.evaluate("[...window.kiln.tasks.keys()].at(-1)")
    page.fill("[name=width]", "60")
    page.click("#submit")
    page.wait_for_selector(".field-error")
    assert "width must be a multiple of 8, got 60" in page.inner_text(".field-error")
    page.wait_for_function("id => window.kiln.tasks.get(id).finished", arg=queued, timeout=120_000)
    assert requests.get(f"{service.url}/v1/tasks/{queued}", timeout=30).json()["status"] == "done"
    shot(page, "bad-input")
    assert all("422" in error for error in page.errors), page.errors  # the refused request, and nothing else


def test_off_loopback_the_page_asks_for_credentials(browser, triton, tmp_path):
    """With auth on (as `kiln serve --listen` off loopback requires), the page and every call it makes need them;
    with them, a generation runs (its WebSocket or, where a browser sends no credentials on one, polling)."""
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path,
                                  security=SecurityOptions(credentials=(("alice", "s3cret"),))))
    try:
        answer = requests.get(live.url, timeout=30)
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Basic")
        page = open_page(browser, live.url, http_credentials={"username": "alice", "password": "s3cret"})
        page.fill("[name=prompt]", "a cat")
        for name, value in (("width", "64"), ("height", "64"), ("steps", "4")):
            page.fill(f"[name={name}]", value)
        generate(page)
        assert not [e for e in page.errors if "WebSocket" not in e], page.errors
    finally:
        live.stop()
