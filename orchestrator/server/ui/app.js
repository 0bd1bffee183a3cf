// kiln's web page: a client of the public API (AUTOMATIC1111's /sdapi/v1, kiln's /v1 tasks, outputs, classify) and
// the task WebSocket. No build step, no dependencies.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const state = { tab: "txt2img", caps: null, tasks: new Map(), current: null, lastSeed: -1, gallery: [], detail: null,
                pngInfo: null, events: [] };
window.kiln = state; // what the browser test reads: the events the page received

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!response.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail))
      : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, detail);
  }
  return data;
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function option(value, label = value) {
  const element = document.createElement("option");
  element.value = value; element.textContent = label;
  return element;
}

// -- tabs ------------------------------------------------------------------------------------------------------------
function showTab(tab) {
  state.tab = tab;
  $$("#tabs button").forEach(b => b.classList.toggle("active", b.dataset.tab === tab));
  $$(".panel[class*='tab-']").forEach(p => { p.hidden = !p.classList.contains(`tab-${tab}`); });
  $$(".only-img2img").forEach(e => { e.hidden = tab !== "img2img"; });
  $$(".only-xyz").forEach(e => { e.hidden = tab !== "xyz"; });
  $$(".not-img2img").forEach(e => { e.hidden = tab === "img2img"; });
  $$(".not-xyz").forEach(e => { e.hidden = tab === "xyz"; });
  $("#submit").textContent = tab === "xyz" ? "Run X/Y/Z plot" : "Generate";
  if (tab === "gallery") loadGallery();
  if (tab === "settings") loadOptions();
}

// -- what the server offers --------------------------------------------------------------------------------------------
async function loadCapabilities() {
  const form = $("#generate");
  try {
    state.caps = await api("GET", "/v1/capabilities");
  } catch (error) {
    $("#server-status").textContent = `server: ${error.message}`;
    return;
  }
  const sd = state.caps.sd;
  $("#checkpoint").textContent = sd ? sd.checkpoint : "no Stable Diffusion build served";
  if (state.caps.sd_unavailable) $("#server-status").textContent = state.caps.sd_unavailable;
  const limits = state.caps.limits;
  form.steps.max = limits.max_steps; form.n_iter.max = limits.max_n_iter; form.batch_size.max = limits.max_batch_size;
  if (sd && sd.checkpoints && sd.checkpoints.length > 1) {  // several checkpoints: each request names its own
    $("#checkpoint-field").hidden = false;
    form.sd_model_checkpoint.replaceChildren(...sd.checkpoints.map(title => option(title)));
    form.sd_model_checkpoint.value = sd.checkpoint;
  }
  $("#image-cfg-field").hidden = !(sd && sd.edit_unet);  // an instruct-pix2pix checkpoint's image guidance
  if (sd) {
    for (const name of ["width", "height"]) {
      Object.assign(form[name], { min: sd.min_size, max: sd.max_size, step: sd.size_multiple });
      const value = Math.min(Math.max(Number(form[name].value), sd.min_size), sd.max_size);
      form[name].value = value - (value % sd.size_multiple);
    }
  }
  const [samplers, schedulers, styles, modules, models] = await Promise.all([
    api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/schedulers"), api("GET", "/sdapi/v1/prompt-styles"),
    api("GET", "/controlnet/module_list").catch(() => ({ module_list: [] })),
    api("GET", "/controlnet/model_list").catch(() => ({ model_list: [] }))]);
  form.sampler_name.replaceChildren(...samplers.map(s => option(s.name)));
  form.scheduler.replaceChildren(...schedulers.map(s => option(s.name, s.label || s.name)));
  if (styles.length) {
    $("#styles-field").hidden = false;
    form.styles.replaceChildren(...styles.map(s => option(s.name)));
  }
  const [latentModes, upscalers] = await Promise.all([
    api("GET", "/sdapi/v1/latent-upscale-modes").catch(() => []), api("GET", "/sdapi/v1/upscalers").catch(() => [])]);
  form.hr_upscaler.replaceChildren(...[...latentModes, ...upscalers].map(u => option(u.name)));
  state.modules = modules.module_list; state.moduleDetail = modules.module_detail || {};
  state.models = models.model_list;
  $("#controlnet").hidden = !state.models.length;
  const axes = await api("GET", "/v1/xyz-axes").catch(() => ({ txt2img: [] }));
  for (const select of $$(".axis-type")) select.replaceChildren(...axes.txt2img.map(a => option(a)));
}

// -- the generation form -------------------------------------------------------------------------------------------
function numberOr(value, fallback) {
  return value === "" || value === undefined ? fallback : Number(value);
}

async function generationBody(kind) {
  const form = $("#generate");
  const body = {
    prompt: form.prompt.value, negative_prompt: form.negative_prompt.value,
    sampler_name: form.sampler_name.value, scheduler: form.scheduler.value || undefined,
    steps: numberOr(form.steps.value, 20), cfg_scale: numberOr(form.cfg_scale.value, 7),
    width: numberOr(form.width.value, 512), height: numberOr(form.height.value, 512),
    seed: numberOr(form.seed.value, -1), n_iter: numberOr(form.n_iter.value, 1),
    subseed: numberOr(form.subseed.value, -1), subseed_strength: numberOr(form.subseed_strength.value, 0),
    seed_resize_from_w: numberOr(form.seed_resize_from_w.value, 0),
    seed_resize_from_h: numberOr(form.seed_resize_from_h.value, 0),
    batch_size: numberOr(form.batch_size.value, 1), save_images: true,
    styles: $$("option", form.styles).filter(o => o.selected).map(o => o.value),
  };
  body.override_settings = { randn_source: form.randn_source.value };
  if (!$("#checkpoint-field").hidden) body.override_settings.sd_model_checkpoint = form.sd_model_checkpoint.value;
  if (kind === "txt2img" && form.enable_hr.checked) Object.assign(body, hiresFields());
  let soft = null;
  if (kind === "img2img") {
    if (!state.initImage) throw new FieldError("init_images", "choose an image for img2img");
    body.init_images = [state.initImage];
    body.denoising_strength = numberOr(form.denoising_strength.value, 0.75);
    if (form.color_correction.checked) body.override_settings.img2img_color_correction = true;
    if (!$("#image-cfg-field").hidden) body.image_cfg_scale = numberOr(form.image_cfg_scale.value, 1.5);
    if (form.soft_inpainting.checked && !maskPainted()) {
      throw new FieldError("soft_inpainting", "soft inpainting blends by the mask: paint one");
    }
    if (maskPainted()) {
      body.mask = $("#mask-canvas").toDataURL("image/png").split(",", 2)[1];
      body.mask_blur = numberOr(form.mask_blur.value, 4);
      body.inpainting_fill = Number(form.inpainting_fill.value);
      body.inpainting_mask_invert = form.inpainting_mask_invert.checked ? 1 : 0;
      body.inpaint_full_res = form.inpaint_full_res.checked;
      body.inpaint_full_res_padding = numberOr(form.inpaint_full_res_padding.value, 32);
      if (form.soft_inpainting.checked) {  // AUTOMATIC1111's always-on script: [enabled, its six sliders]
        soft = { "soft inpainting": { args: [true, ...$$(".soft-arg", form).map(i => Number(i.value))] } };
      }
    }
  }
  const units = [];
  if (state.tab !== "xyz") {
    for (const unit of $$("#units .unit")) {
      const file = $(".unit-image", unit).files[0];  // img2img: none takes the init image (an inpaint unit its mask)
      if (!file && state.tab !== "img2img") throw new FieldError("controlnet", "each ControlNet unit needs an image");
      // (without an image the unit fits img2img's init image by img2img's resize mode, as the extension does)
      const own = file ? { image: await fileToBase64(file), resize_mode: $(".unit-resize", unit).value } : {};
      units.push({ ...own, module: $(".unit-module", unit).value,
                   model: $(".unit-model", unit).value, weight: Number($(".unit-weight", unit).value),
                   guidance_start: Number($(".unit-start", unit).value),
                   guidance_end: Number($(".unit-end", unit).value),
                   control_mode: $(".unit-control-mode", unit).value,
                   ...Object.fromEntries($$(".unit-slider", unit).map(i => [i.dataset.field, Number(i.value)])) });
    }
  }
  if (units.length || soft) body.alwayson_scripts = { ...(units.length ? { controlnet: { args: units } } : {}),
                                                       ...soft };
  return body;
}

// The form's hires fix, as AUTOMATIC1111's fields (its denoising_strength is the hires pass's in txt2img).
function hiresFields() {
  const form = $("#generate");
  return { enable_hr: true, hr_upscaler: form.hr_upscaler.value || undefined,
           hr_scale: numberOr(form.hr_scale.value, 2),
           hr_second_pass_steps: numberOr(form.hr_second_pass_steps.value, 0),
           hr_resize_x: numberOr(form.hr_resize_x.value, 0), hr_resize_y: numberOr(form.hr_resize_y.value, 0),
           denoising_strength: numberOr(form.hr_denoising_strength.value, 0.7) };
}

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

function clearErrors() {
  $$(".field-error").forEach(e => e.remove());
  $$(".invalid").forEach(e => e.classList.remove("invalid"));
  $("#form-error").hidden = true;
}

// The API names the field its message is about ("width must be ...", "steps: ..."): show it there too.
function showError(message, field) {
  const form = $("#generate");
  const named = field || (message.match(/^([a-z_]+)[\s:.\[]/) || [])[1];
  const input = named && form.elements[named];
  if (input && input.closest) {
    input.classList.add("invalid");
    const note = document.createElement("span");
    note.className = "field-error"; note.textContent = message;
    input.closest("label").after(note);
  }
  $("#form-error").textContent = message;
  $("#form-error").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const kind = state.tab === "img2img" ? "img2img" : "txt2img";
  let body;
  try {
    body = await generationBody(kind);
  } catch (error) {
    showError(error.message, error.field);
    return;
  }
  if (state.tab === "xyz") return runXYZ(body);
  // AUTOMATIC1111's selectable scripts, with their script_args: one at a time, as there
  const form = $("#generate");
  const scripts = [
    form.prompt_matrix.checked && [kind, body, "prompt matrix", "Prompt matrix", [
      $("#matrix-at-start").checked, $("#matrix-different-seeds").checked, $("#matrix-prompt-type").value,
      $("#matrix-delimiter").value, numberOr($("#matrix-margin").value, 0)]],
    form.prompts_from_file.checked && [kind, body, "prompts from file or textbox", "Prompts from file", [
      $("#lines-iterate").checked, $("#lines-same-seed").checked, $("#lines-position").value,
      $("#lines-text").value], kind],
    kind === "img2img" && form.loopback.checked && [kind, body, "loopback", "Loopback", [
      numberOr($("#loopback-loops").value, 4), numberOr($("#loopback-final").value, 0.5),
      $("#loopback-curve").value, "None"]],
    kind === "img2img" && form.outpainting.checked && outpaintingScript(kind, body),
  ].filter(Boolean);
  if (scripts.length > 1) {
    return showError("choose one script: the prompt matrix, prompts from file, loopback or outpainting");
  }
  if (scripts.length) return runScript(...scripts[0]);
  try {
    const accepted = await api("POST", `/v1/tasks/${kind}`, body);
    track(accepted.id, kind, body.prompt);
  } catch (error) {
    showError(error.message);
  }
}

// -- one task: its WebSocket (progress, previews), polling when the socket cannot open ------------------------------
function track(id, kind, prompt) {
  const task = { id, kind, prompt, status: "queued", progress: 0, step: 0, steps: 0, eta: null };
  state.tasks.set(id, task);
  state.current = id;
  setProgress(0, "queued");
  $("#preview").hidden = true;
  renderQueue();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let socket, opened = false;
  try {
    socket = new WebSocket(`${scheme}://${location.host}/v1/tasks/${id}/events?preview_every=1`);
  } catch (_) {
    return poll(task);
  }
  socket.onopen = () => { opened = true; };
  socket.onmessage = message => onEvent(task, JSON.parse(message.data));
  socket.onerror = () => { if (!opened) poll(task); };
  socket.onclose = () => { if (opened && !["done", "failed", "cancelled"].includes(task.status)) poll(task); };
}

function onEvent(task, event) {
  state.events.push({ task: task.id, event: event.event, step: event.step, preview: Boolean(event.preview) });
  if (event.event === "progress") {
    Object.assign(task, { status: "running", step: event.step, steps: event.steps, progress: event.progress });
    const now = performance.now();
    task.startedAt = task.startedAt || now;
    const elapsed = (now - task.startedAt) / 1000;
    task.eta = event.progress > 0 && event.step > 1 ? elapsed / event.progress - elapsed : null;
    if (state.current === task.id) {
      const eta = task.eta != null ? `, ~${Math.ceil(task.eta)} s left` : "";
      setProgress(event.progress, `step ${event.step}/${event.steps}${eta}`);
      if (event.preview) {
        $("#preview").src = `data:image/png;base64,${event.preview}`;
        $("#preview").hidden = false;
      }
    }
  } else if (event.event === "started" || event.event === "state") {
    task.status = event.status || "running";
  } else if (["done", "failed", "cancelled"].includes(event.event)) {
    finish(task, event.event, event.error);
  }
  renderQueue();
}

async function poll(task) {
  while (!["done", "failed", "cancelled"].includes(task.status)) {
    try {
      const current = await api("GET", `/v1/tasks/${task.id}`);
      Object.assign(task, { status: current.status, progress: current.progress, step: current.step,
                            steps: current.steps });
      if (state.current === task.id && current.status === "running") {
        setProgress(current.progress, `step ${current.step}/${current.steps}`);
      }
      if (["done", "failed", "cancelled"].includes(current.status)) {
        return finish(task, current.status, current.error, current.result);
      }
    } catch (_) { /* the server restarts or the network blinks: keep polling */ }
    renderQueue();
    await new Promise(resolve => setTimeout(resolve, 500));
  }
}

async function finish(task, status, error, result) {
  if (task.finished) return;
  task.finished = true;
  task.status = status;
  renderQueue();
  if (state.current !== task.id) return;
  if (status !== "done") {
    setProgress(0, status === "failed" ? `failed: ${error || ""}` : "cancelled");
    return;
  }
  setProgress(1, "done");
  if (!result) result = (await api("GET", `/v1/tasks/${task.id}`)).result;
  showResult(result, task.kind);
  state.shown = task.id;
}

// A base64 image's data URL, its type read from its first bytes (the server's samples_format: PNG, JPEG or WebP).
function imageURL(base64) {
  const type = base64.startsWith("/9j/") ? "jpeg" : base64.startsWith("UklGR") ? "webp" : "png";
  return `data:image/${type};base64,${base64}`;
}

function showResult(result, kind = "txt2img") {
  $("#preview").hidden = true;
  const info = typeof result.info === "string" ? JSON.parse(result.info) : result.info;
  const infotexts = info.infotexts || [];
  // a batch's images come after its grid, where there is one (AUTOMATIC1111's index_of_first_image); the infotexts
  // are the pictures', the grid's first
  const first = info.index_of_first_image || 0;
  state.result = { images: result.images, info, kind, selected: first };
  $("#results").replaceChildren(...result.images.map((image, index) => {
    const element = document.createElement("img");
    element.src = imageURL(image);
    element.alt = `result ${index + 1}`;
    element.className = "result";
    element.classList.toggle("selected", index === first);
    element.onclick = () => {
      state.result.selected = index;
      $$("#results .result").forEach((e, i) => e.classList.toggle("selected", i === index));
      $("#info").textContent = infotexts[index] || "";
      $("#hires-this").hidden = !canHiresFix();
    };
    return element;
  }));
  state.lastSeed = info.seed;
  $("#info").textContent = infotexts[first] || "";
  $("#hires-this").hidden = !canHiresFix();
}

// AUTOMATIC1111's Upscale button: a txt2img image (not its grid, nor a ControlNet unit's detected map after the
// images) redrawn by the hires fix alone (firstpass_image).
function canHiresFix() {
  const shown = state.result;
  const index = shown ? shown.selected - (shown.info.index_of_first_image || 0) : -1;
  return Boolean(shown && shown.kind === "txt2img" && index >= 0 && index < (shown.info.all_seeds || []).length);
}

async function hiresThis() {
  const shown = state.result;
  const index = shown.selected - (shown.info.index_of_first_image || 0);
  await hiresOf(shown.images[shown.selected], shown.info.all_seeds[index], (shown.info.all_subseeds || [])[index]);
}

// The gallery's: a saved txt2img image, its parameters put back into the form first (its seed, prompt, sampler).
async function hiresSaved(item = state.detail) {
  if (!item) return;
  reuse(item.fields);
  showTab("txt2img");
  const image = await fileToBase64(await (await fetch(item.url)).blob());
  await hiresOf(image, Number(item.fields.Seed), undefined);
}

function canHiresSaved(item) {
  return Boolean(item && item.path.startsWith("txt2img-images/") && item.fields && item.fields.Seed !== undefined);
}

// A txt2img task of `image` (base64) as the first pass: this form's prompt and hires settings, the image's seed.
async function hiresOf(image, seed, subseed) {
  clearErrors();
  const picture = new Image();
  picture.src = imageURL(image);
  await picture.decode();
  let body;
  try {
    body = await generationBody("txt2img");
  } catch (error) {
    showError(error.message, error.field);
    return;
  }
  Object.assign(body, hiresFields(), {
    firstpass_image: image, width: picture.naturalWidth, height: picture.naturalHeight, batch_size: 1, n_iter: 1,
    seed, subseed: subseed ?? body.subseed });
  try {
    const accepted = await api("POST", "/v1/tasks/txt2img", body);
    track(accepted.id, "txt2img", body.prompt);
  } catch (error) {
    showError(error.message);
  }
}

function setProgress(fraction, text) {
  const percent = Math.round(fraction * 100);
  $("#progress-bar").style.width = `${percent}%`;
  $("#progress").setAttribute("aria-valuenow", String(percent));
  $("#progress-text").textContent = text;
}

// -- the queue: the caller's tasks with their positions and cancel buttons, everyone else's as counts ---------------
async function refreshQueue() {
  try {
    const listing = await api("GET", "/v1/tasks");
    for (const summary of listing.tasks) {
      const known = state.tasks.get(summary.id);
      if (known && !known.finished) {
        Object.assign(known, { position: summary.queue_position, eta: summary.eta_seconds,
                               progress: Math.max(known.progress || 0, summary.progress) });
        if (summary.status === "running" && known.status === "queued") known.status = "running";
        if (["done", "failed", "cancelled"].includes(summary.status) && known.status !== summary.status) {
          finish(known, summary.status, summary.error);
        }
      } else if (!known) {
        state.tasks.set(summary.id, { id: summary.id, kind: summary.kind, prompt: summary.prompt,
                                      status: summary.status, progress: summary.progress,
                                      position: summary.queue_position, eta: summary.eta_seconds,
                                      finished: ["done", "failed", "cancelled"].includes(summary.status) });
      }
    }
    const others = listing.others;
    $("#others").textContent = `others: ${others.queued} queued, ${others.running} running`;
    renderQueue();
  } catch (_) { /* shown by the next successful refresh */ }
}

// Each task keeps its list item: the item is updated in place, never rebuilt, so that a Cancel button stays put
// while progress events arrive (a click whose press and release land on two rebuilt buttons is lost).
function renderQueue() {
  const list = $("#queue");
  const kept = new Map($$("li", list).map(item => [item.dataset.task, item]));
  const items = [...state.tasks.values()].reverse().slice(0, 20).map(task => {
    const item = kept.get(task.id) || queueItem(task);
    item.className = `task ${task.status}`;
    const eta = task.eta != null && task.status === "running" ? `, ~${Math.ceil(task.eta)} s left` : "";
    const where = task.status === "queued" && task.position ? ` #${task.position}` : "";
    const text = `${task.kind}: ${(task.prompt || "").slice(0, 40)} — ${task.status}${where}${eta}`;
    const label = $(".label", item);
    if (label.textContent !== text) label.textContent = text;
    $(".mini-bar", item).style.width = `${Math.round((task.progress || 0) * 100)}%`;
    $(".cancel", item).hidden = $(".interrupt", item).hidden = !(task.status === "queued" ||
                                                                 task.status === "running");
    $(".skip", item).hidden = task.status !== "running";
    return item;
  });
  items.forEach((item, index) => {  // only items out of place move
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] || null);
  });
  while (list.children.length > items.length) list.lastElementChild.remove();
}

function queueItem(task) {
  const item = document.createElement("li");
  item.dataset.task = task.id;
  const label = document.createElement("span");
  label.className = "label";
  const bar = document.createElement("div");
  bar.className = "mini-bar";
  // Cancel drops the task; Interrupt (AUTOMATIC1111's) ends it keeping what is done; Skip ends the running image
  const buttons = [["cancel", "Cancel", "DELETE", "", "drop the task and its images"],
                   ["interrupt", "Interrupt", "POST", "/interrupt", "stop now and keep what is done"],
                   ["skip", "Skip", "POST", "/skip", "end the image being made, go on with the next"]];
  item.append(label, bar, ...buttons.map(([name, text, method, path, title]) => {
    const button = document.createElement("button");
    button.type = "button"; button.className = name; button.textContent = text; button.title = title;
    button.onclick = async () => {
      try { await api(method, `/v1/tasks/${task.id}${path}`); } catch (error) { showError(error.message); }
      refreshQueue();
    };
    return button;
  }));
  return item;
}

// -- img2img: the image and the mask painted on it ------------------------------------------------------------------
async function loadInitImage(file, base64) {
  state.initImage = base64 || await fileToBase64(file);
  const image = new Image();
  await new Promise((resolve, reject) => {
    image.onload = resolve; image.onerror = reject;
    image.src = `data:image;base64,${state.initImage}`;
  });
  for (const canvas of [$("#init-canvas"), $("#mask-canvas")]) {
    canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
  }
  $("#init-canvas").getContext("2d").drawImage(image, 0, 0);
  clearMask();
}

function clearMask() {
  const canvas = $("#mask-canvas");
  const context = canvas.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, canvas.width, canvas.height);
  state.maskPainted = false;
}

function maskPainted() { return Boolean(state.maskPainted); }

function setUpMaskPainting() {
  const canvas = $("#mask-canvas");
  let painting = false;
  const paint = event => {
    if (!painting) return;
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width;
    const context = canvas.getContext("2d");
    context.fillStyle = "white";
    context.beginPath();
    context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
                Number($("#brush").value) * scale / 2, 0, 2 * Math.PI);
    context.fill();
    state.maskPainted = true;
  };
  canvas.addEventListener("pointerdown", event => { painting = true; canvas.setPointerCapture(event.pointerId);
                                                    paint(event); });
  canvas.addEventListener("pointermove", paint);
  canvas.addEventListener("pointerup", () => { painting = false; });
  $("#clear-mask").onclick = clearMask;
  $("#init-file").onchange = event => event.target.files[0] && loadInitImage(event.target.files[0]);
}

// -- ControlNet units -------------------------------------------------------------------------------------------------
function addUnit() {
  const unit = $("#unit-template").content.firstElementChild.cloneNode(true);
  const module = $(".unit-module", unit);
  module.replaceChildren(...(state.modules || ["none"]).map(m => option(m)));
  module.onchange = () => showSliders(unit);
  $(".unit-model", unit).replaceChildren(...(state.models || []).map(m => option(m)));
  showSliders(unit);
  const image = $(".unit-image", unit), resize = $(".unit-resize", unit);
  image.onchange = () => { resize.disabled = !image.files.length; };  // it fits the unit's own image only
  image.onchange();
  $(".remove-unit", unit).onclick = () => unit.remove();
  $("#units").append(unit);
}

// The unit's module's sliders, as /controlnet/module_list details them: its resolution (processor_res), then
// threshold_a and threshold_b, each at its default within its range.
function showSliders(unit) {
  const detail = (state.moduleDetail || {})[$(".unit-module", unit).value] || { sliders: [] };
  const fields = ["threshold_a", "threshold_b"];
  $(".unit-sliders", unit).replaceChildren(...detail.sliders.map(slider => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    Object.assign(input, { type: "number", className: "unit-slider", min: slider.min, max: slider.max,
                           step: slider.step, value: slider.value });
    input.dataset.field = slider.name === "Resolution" ? "processor_res" : fields.shift();
    label.append(`${slider.name} `, input);
    return label;
  }));
}

// -- X/Y/Z plot and the other scripts: AUTOMATIC1111's scripts through the API; their images run as tasks through the
// step batcher -------------------------------------------------------------------------------------------------------
async function runXYZ(body) {
  const axes = $$(".axis").map(axis => [$(".axis-type", axis).value || "Nothing", $(".axis-values", axis).value]);
  return runScript("txt2img", body, "x/y/z plot", "X/Y/Z plot", [
    axes[0][0], axes[0][1], null, axes[1][0], axes[1][1], null, axes[2][0], axes[2][1], null,
    $("#xyz-legend").checked, false, false, false, 0, true, false], "xyz");
}

// Outpainting, either of AUTOMATIC1111's scripts (both make their own masks: a painted one stays for the next
// inpainting)
function outpaintingScript(kind, body) {
  const pixels = numberOr($("#outpaint-pixels").value, 128), blur = numberOr($("#outpaint-blur").value, 4);
  const directions = $$("#outpaint-directions input:checked").map(box => box.value);
  const unmasked = { ...body, mask: undefined };
  if ($("#outpaint-method").value === "mk2") {
    return [kind, unmasked, "outpainting mk2", "Outpainting mk2", [null, pixels, blur, directions,
      numberOr($("#outpaint-noise-q").value, 1), numberOr($("#outpaint-variation").value, 0.05)], "grid"];
  }
  return [kind, unmasked, "poor man's outpainting", "Outpainting", [pixels, blur, Number($("#outpaint-fill").value),
    directions], "grid"];
}

async function runScript(kind, body, name, label, args, shown = "grid") {
  body.script_name = name;
  body.script_args = args;
  setProgress(0, `${label}: images queued`);
  const started = Date.now();
  const ticker = setInterval(refreshQueue, 500);
  try {
    const result = await api("POST", `/sdapi/v1/${kind}`, body);
    setProgress(1, `${label} done in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    showResult(result, shown);
  } catch (error) {
    setProgress(0, `${label} failed`);
    showError(error.message);
  } finally {
    clearInterval(ticker);
    refreshQueue();
  }
}

// -- classify ---------------------------------------------------------------------------------------------------------
async function classify(files) {
  $("#classify-error").hidden = true;
  try {
    const images = await Promise.all([...files].map(fileToBase64));
    const answer = await api("POST", "/v1/classify", { images, top_k: Number($("#top-k").value) });
    $("#classify-results").replaceChildren(...answer.results.map((result, index) => {
      const card = document.createElement("div");
      card.className = "classification";
      const title = document.createElement("h3");
      title.textContent = files[index].name;
      card.append(title);
      if (result.error) {
        const error = document.createElement("p");
        error.className = "error"; error.textContent = result.error;
        card.append(error);
      }
      for (const top of result.top || []) {
        const row = document.createElement("div");
        row.className = "score";
        row.innerHTML = `<span class="label"></span><span class="bar"></span><span class="value"></span>`;
        $(".label", row).textContent = top.label;
        $(".bar", row).style.width = `${Math.round(top.score * 100)}%`;
        $(".value", row).textContent = top.score.toFixed(3);
        card.append(row);
      }
      return card;
    }));
  } catch (error) {
    $("#classify-error").textContent = error.message;
    $("#classify-error").hidden = false;
  }
}

// A drop zone and its file input: `onFiles` gets what is dropped or chosen.
function dropZone(drop, input, onFiles) {
  input.onchange = event => onFiles(event.target.files);
  drop.addEventListener("dragover", event => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", event => {
    event.preventDefault(); drop.classList.remove("over");
    onFiles(event.dataTransfer.files);
  });
}

// -- PNG info: an image's infotext (POST /sdapi/v1/png-info), and its fields into the form -----------------------
async function readPngInfo(files) {
  const file = files[0];
  if (!file) return;
  $("#png-error").hidden = true;
  try {
    const base64 = await fileToBase64(file);
    const answer = await api("POST", "/sdapi/v1/png-info", { image: base64 });
    state.pngInfo = { url: imageURL(base64), fields: answer.parameters, path: file.name };
    $("#png-image").src = state.pngInfo.url;
    $("#png-parameters").textContent = answer.info || "(no parameters in this image)";
    $("#png-detail").hidden = false;
    $$("#png-detail button").forEach(b => { b.disabled = !answer.info; });
  } catch (error) {
    $("#png-detail").hidden = true;
    $("#png-error").textContent = error.message; $("#png-error").hidden = false;
  }
}

// -- gallery ----------------------------------------------------------------------------------------------------------
async function loadGallery() {
  try {
    const listing = await api("GET", "/v1/outputs?limit=60");
    state.gallery = listing.items;
    $("#gallery-count").textContent = `${listing.total} saved images`;
    $("#gallery-grid").replaceChildren(...listing.items.map((item, index) => {
      const thumb = document.createElement("img");
      thumb.src = item.url; thumb.alt = item.path; thumb.loading = "lazy"; thumb.className = "thumb";
      thumb.onclick = () => showDetail(index);
      return thumb;
    }));
  } catch (error) {
    $("#gallery-count").textContent = error.message;
  }
}

function showDetail(index) {
  const item = state.gallery[index];
  state.detail = item;
  $("#gallery-detail").hidden = false;
  $("#detail-image").src = item.url;
  $("#detail-parameters").textContent = item.parameters || "(no parameters in this file)";
  $("#download").href = item.url;
  $("#download").setAttribute("download", item.path.split("/").pop());
  $("#detail-hires").hidden = !canHiresSaved(item);
}

// Fill the form from an image's infotext fields (AUTOMATIC1111's names).
function reuse(fields) {
  const form = $("#generate");
  const set = (name, value) => { if (value !== undefined && value !== "") form[name].value = value; };
  set("prompt", fields.Prompt); set("negative_prompt", fields["Negative prompt"]);
  set("steps", fields.Steps); set("cfg_scale", fields["CFG scale"]); set("seed", fields.Seed);
  set("width", fields["Size-1"]); set("height", fields["Size-2"]);
  set("subseed", fields["Variation seed"]); set("subseed_strength", fields["Variation seed strength"]);
  set("seed_resize_from_w", fields["Seed resize from-1"]); set("seed_resize_from_h", fields["Seed resize from-2"]);
  const source = fields.RNG || "GPU";  // AUTOMATIC1111 writes no RNG for its default, GPU
  if ($$("option", form.randn_source).some(o => o.value === source)) form.randn_source.value = source;
  if (fields["Variation seed"] || fields["Seed resize from"] || form.randn_source.value !== "CPU") {
    $("#seed-extra").open = true;
  }
  const listed = name => $$("option", form.sampler_name).some(o => o.value === name);
  let [sampler, type] = [fields.Sampler, fields["Schedule type"]];
  // kiln writes a sampler on a schedule type as one name ("Euler a Karras"), as AUTOMATIC1111 before 1.9
  const suffix = $$("option", form.scheduler).find(o => sampler && sampler.endsWith(" " + o.textContent));
  if (sampler && !listed(sampler) && suffix) {
    [sampler, type] = [sampler.slice(0, -suffix.textContent.length - 1), suffix.textContent];
  }
  if (sampler && listed(sampler)) form.sampler_name.value = sampler;
  const schedule = $$("option", form.scheduler).find(o => o.textContent === type);
  if (schedule) form.scheduler.value = schedule.value;
  if (fields["Denoising strength"]) set("denoising_strength", fields["Denoising strength"]);
  set("image_cfg_scale", fields["Image CFG scale"]);
  // soft inpainting's, where the image had it (its script's labels)
  form.soft_inpainting.checked = fields["Soft inpainting enabled"] === "True";
  for (const input of $$(".soft-arg", form)) {
    const words = input.name.slice("soft_".length).replaceAll("_", " ");
    set(input.name, fields[`Soft inpainting ${words}`]);
  }
  if (form.soft_inpainting.checked) $("#soft-inpainting").open = true;
  // the hires fix's, where the image had one (its denoising strength is then the hires pass's)
  const hires = fields["Hires upscale"] !== undefined || fields["Hires resize-1"] !== undefined;
  form.enable_hr.checked = hires;
  if (hires) {
    set("hr_scale", fields["Hires upscale"]); set("hr_second_pass_steps", fields["Hires steps"] || 0);
    set("hr_resize_x", fields["Hires resize-1"] || 0); set("hr_resize_y", fields["Hires resize-2"] || 0);
    set("hr_denoising_strength", fields["Denoising strength"]);
    if ($$("option", form.hr_upscaler).some(o => o.value === fields["Hires upscaler"])) {
      form.hr_upscaler.value = fields["Hires upscaler"];
    }
    $("#hires").open = true;
  }
}

async function sendTo(tab, item = state.detail) {
  if (!item) return;
  reuse(item.fields);
  if (tab === "img2img") {
    const blob = await (await fetch(item.url)).blob();
    await loadInitImage(null, await fileToBase64(blob));
  }
  showTab(tab);
}

// -- settings: the options the API exposes ----------------------------------------------------------------------------
async function loadOptions() {
  const form = $("#options-form");
  try {
    state.options = await api("GET", "/sdapi/v1/options");
  } catch (error) {
    $("#settings-error").textContent = error.message; $("#settings-error").hidden = false;
    return;
  }
  form.replaceChildren(...Object.entries(state.options).filter(([, v]) => v === null || typeof v !== "object")
    .map(([name, value]) => {
      const label = document.createElement("label");
      label.textContent = name;
      const input = document.createElement("input");
      input.name = name;
      if (typeof value === "boolean") { input.type = "checkbox"; input.checked = value; }
      else if (typeof value === "number") { input.type = "number"; input.step = "any"; input.value = value; }
      else { input.value = value ?? ""; }
      label.append(input);
      return label;
    }));
}

async function saveOptions() {
  $("#settings-error").hidden = true; $("#settings-saved").hidden = true;
  const changed = {};
  for (const input of $$("#options-form input")) {
    const old = state.options[input.name];
    const value = input.type === "checkbox" ? input.checked : input.type === "number" ? Number(input.value)
      : input.value;
    if (value !== old && !(old === null && value === "")) changed[input.name] = value;
  }
  try {
    await api("POST", "/sdapi/v1/options", changed);
    $("#settings-saved").hidden = false;
    await loadOptions();
  } catch (error) {
    $("#settings-error").textContent = error.message; $("#settings-error").hidden = false;
  }
}

// -- start ------------------------------------------------------------------------------------------------------------
function start() {
  $$("#tabs button").forEach(b => { b.onclick = () => showTab(b.dataset.tab); });
  $("#generate").addEventListener("submit", submit);
  $("#dice").onclick = () => { $("#generate").seed.value = -1; };
  $("#recycle").onclick = () => { $("#generate").seed.value = state.lastSeed; };
  $("#add-unit").onclick = addUnit;
  $("#hires-this").onclick = hiresThis;
  $("#refresh-gallery").onclick = loadGallery;
  $("#send-txt2img").onclick = () => sendTo("txt2img");
  $("#send-img2img").onclick = () => sendTo("img2img");
  $("#detail-hires").onclick = () => hiresSaved();
  $("#save-options").onclick = saveOptions;
  $("#outpaint-method").onchange = () => {  // each method's own settings
    const mk2 = $("#outpaint-method").value === "mk2";
    $$(".outpaint-mk2").forEach(label => { label.hidden = !mk2; });
    $$(".outpaint-poor").forEach(label => { label.hidden = mk2; });
    $("#outpaint-blur").max = mk2 ? 16 : 32;  // the tiles' masks blur by twice it, mk2's by four times (64 at most)
  };
  setUpMaskPainting();
  dropZone($("#drop"), $("#classify-files"), classify);
  dropZone($("#png-drop"), $("#png-file"), readPngInfo);
  $("#png-send-txt2img").onclick = () => sendTo("txt2img", state.pngInfo);
  $("#png-send-img2img").onclick = () => sendTo("img2img", state.pngInfo);
  showTab("txt2img");
  loadCapabilities();
  refreshQueue();
  setInterval(refreshQueue, 2000);
}

start();
