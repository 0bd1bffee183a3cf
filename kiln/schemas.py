"""The REST API's wire schemas: AUTOMATIC1111's /sdapi/v1 bodies, and ours (/v1). The server validates with them,
and the API client (clients/api.py) builds its requests from them.

Field names, defaults and meanings follow AUTOMATIC1111's API models, so its clients work
unchanged. Every field of its request models is declared here (tests/test_field_walk.py checks), so none is
ignored unread; fields asking for features this server does not have (face restoration, tiling, the refiner, ...)
are refused with a 422 naming the field. Unknown fields are ignored as AUTOMATIC1111 ignores them. NaN and Infinity
are refused everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator

# A field this server does not know is refused by name (it would otherwise be ignored without a word)
STRICT = ConfigDict(allow_inf_nan=False, extra="forbid")


# sd-webui-controlnet's fields kiln runs at their defaults only (the values clients send for "not used")
UNIT_DEFAULTS: dict[str, tuple] = {
    "input_mode": ("simple", "SIMPLE", 0), "use_preview_as_input": (False,), "generated_image": (None,),
    "batch_image_dir": ("", None), "batch_mask_dir": ("", None), "batch_input_gallery": (None, []),
    "batch_mask_gallery": (None, []), "batch_image_files": (None, []), "batch_keyframe_idx": (None, ""),
    "batch_modifiers": (None, []), "animatediff_batch": (False,), "image_fg": (None,), "mask_image_fg": (None,),
    "pulid_mode": ("Fidelity",), "union_control_type": ("Unknown",), "ipadapter_input": (None,)}
# The extension's newer fields (batch and merge inputs, the preview as input, foreground images, PuLID, ControlNet-Union
# types, IP-Adapter inputs, AnimateDiff batches), declared from UNIT_DEFAULTS: each defaults to its first accepted
# value, and anything else is refused
_NewerUnitFields = create_model("_NewerUnitFields", __config__=STRICT,
                                **{name: (Any, values[0]) for name, values in UNIT_DEFAULTS.items()})


class ControlNetUnitArgs(_NewerUnitFields):
    """One unit of sd-webui-controlnet's `alwayson_scripts.controlnet.args`."""

    model_config = STRICT
    enabled: bool = True
    image: Any = None  # base64 string, or {"image": base64, "mask": ...} as sd-webui-controlnet takes it
    input_image: Any = None  # the older name of `image`
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    threshold_a: float = -1  # the module's first slider (canny's low threshold); -1 its default
    threshold_b: float = -1  # its second (canny's high threshold)
    processor_res: int = -1  # the preprocessor's resolution; -1 its default, 512
    resize_mode: Any = None
    control_mode: Any = 0
    pixel_perfect: bool = False
    mask: Any = None  # an inpaint module's mask (base64, the image's size; white: inpaint)
    mask_image: Any = None  # its newer name
    low_vram: bool = False  # a memory strategy of the extension's (offloading); the result is the same either way
    lowvram: bool = False  # its older name
    guess_mode: bool = False  # the old name of control_mode 2: refused, as that is
    guessmode: bool = False
    save_detected_map: bool = True  # the unit's detected map follows the response's images (unless false)
    hr_option: Any = "Both"  # the passes the unit acts in: Both, Low res only, High res only (or 0-2)
    is_ui: bool = False  # whether the unit came from the extension's UI: nothing for an API request to change
    # img2img's "only masked" (inpaint_full_res) crops the unit's image around the mask as it crops the init image
    inpaint_crop_input_image: bool = True
    effective_region_mask: Any = None  # base64 image: the unit acts where it is white (its red channel, stretched)
    advanced_weighting: list[float] | None = None  # a scale per residual, over weight and control_mode's softening

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("guess_mode", "guessmode"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server")
        for name, defaults in UNIT_DEFAULTS.items():
            if getattr(self, name) not in defaults:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported by this server (it runs "
                                 f"{defaults[0]!r})")
        return self


class Txt2ImgBody(BaseModel):
    model_config = STRICT
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    # deprecated AUTOMATIC1111 name of sampler_name; SD.Next sends an integer, the index into /sdapi/v1/samplers
    sampler_index: str | int | None = None
    scheduler: str | None = None  # AUTOMATIC1111 1.9+: "Automatic", "Karras", ...
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None  # seamless images: the build's _tiling models (kiln build sd --tiling)
    # kiln's: the VAE decodes and encodes in tiles (less memory for large images, seams blended as diffusers'
    # enable_vae_tiling); null: above the server's --vae-tile-above pixels
    vae_tiling: bool | None = None
    enable_hr: bool = False  # the hires fix: the hr_* fields below shape its second pass
    denoising_strength: float | None = None  # txt2img: the hires pass's (None: AUTOMATIC1111's 0.75)
    # AUTOMATIC1111's pre-1.0 hires fix fields: both set, they are the size generated (its first pass, whose target
    # is then hr_scale or hr_resize_x/y of it, as 1.x computes it); width and height are not used. txt2img's only
    firstphase_width: int = Field(0, ge=0)
    firstphase_height: int = Field(0, ge=0)
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: "Latent" (AUTOMATIC1111's latent_upscale_default_mode)
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None  # the served checkpoint only
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    # AUTOMATIC1111's sampler and refiner fields. The churn (s_churn, s_tmin, s_tmax, s_noise) runs where the sampler
    # has it (Euler); the others' defaults (what its clients send) are accepted, anything else is refused by name
    # until kiln runs it (never accepted and ignored)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None  # None or 0: no upper bound, as AUTOMATIC1111 reads it
    s_noise: float = 1.0
    s_min_uncond: float = 0.0
    refiner_checkpoint: str | None = None  # another served checkpoint finishing the denoising (SDXL's refiner)
    refiner_switch_at: float | None = Field(None, ge=0, le=1)  # when it takes over (None: 0.8, A1111's UI default)
    initial_noise_multiplier: float | None = None
    force_task_id: str | None = Field(None, min_length=1, max_length=128,
                                      description="the task id to give this job (progress?id_task= follows it)")
    disable_extra_networks: bool = False  # extra-network tags (<lora:...>) are taken out of the prompts, not run
    firstpass_image: str | None = None  # the hires fix's first pass, given (base64): that pass is not run
    comments: dict[str, Any] | None = None  # AUTOMATIC1111 discards a request's own: refused unless empty
    infotext: str | None = None  # AUTOMATIC1111 1.8+: fields the request leaves unset, from an infotext (server.paste)
    # AUTOMATIC1111 1.10's (Forge's) modules for the hires pass: "Use same choices" (its default) only
    hr_additional_modules: list[str] | None = None
    # SD.Next's top-level clip skip (its CLIP_stop_at_last_layers): a whole number of layers, 1 the last
    clip_skip: float | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _unsupported(self):
        refuse = {"restore_faces": self.restore_faces,
                  "comments": self.comments,
                  "hr_additional_modules": self.hr_additional_modules not in (None, [], ["Use same choices"]),
                  "a fractional clip_skip (SD.Next's interpolation between layers)":
                      self.clip_skip is not None and self.clip_skip != int(self.clip_skip)}
        for name, value in refuse.items():
            if value:
                raise ValueError(f"{name} is not supported by this server")
        if (self.seed_resize_from_w > 0) != (self.seed_resize_from_h > 0):
            raise ValueError("seed_resize_from_w and seed_resize_from_h: Resize seed from takes both (or neither, 0 "
                             "or -1)")
        if (self.firstphase_width > 0) != (self.firstphase_height > 0):
            raise ValueError("firstphase_width and firstphase_height: the first pass's size takes both (or neither, "
                             "0)")
        return self


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(default_factory=list)
    # 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)
    resize_mode: int = Field(0, ge=0, le=3)
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_fill: int = Field(0, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "only masked": inpaint a crop around the mask, paste it back
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    # instruct-pix2pix's image guidance (an edit checkpoint's; elsewhere 1.5, AUTOMATIC1111's UI default, or none)
    image_cfg_scale: float | None = None
    include_init_images: bool = False
    # what the latents are blended by and the fill paints by, as given (base64, width x height, white = repaint; not
    # blurred or inverted); None: the mask. AUTOMATIC1111's API passes it on undecoded (and fails); kiln decodes it
    latent_mask: str | None = None
    mask_round: bool = True  # false: the mask's alpha, the latent mask and a 9-channel UNet's mask stay soft
    # not a field (no client sends it): what img2img_color_correction matches the colours to, where a script sets it
    # (its Loopback: the first loop's init image), in base64 as init_images holds it; empty: the init image
    _color_target: str = PrivateAttr(default="")

    @property
    def color_target(self) -> str:
        return self._color_target

    @model_validator(mode="after")
    def _unsupported_img2img(self):
        if self.firstphase_width or self.firstphase_height:
            raise ValueError("firstphase_width and firstphase_height are txt2img's first pass size; img2img has no "
                             "first pass (its size is width and height)")
        return self


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs with the `parameters` text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seeds used, infotexts, model")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoBody(BaseModel):
    model_config = STRICT
    image: str = Field(min_length=1, description="base64 PNG (data: URL prefix allowed)")


class InterrogateBody(BaseModel):
    model_config = STRICT
    image: str = Field(min_length=1, description="base64 image (data: URL prefix allowed)")
    model: str = Field("clip", description="AUTOMATIC1111's interrogator: clip or deepdanbooru")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class ModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class TaskAccepted(BaseModel):
    id: str
    status: str
    queue_position: int


class TaskState(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    queue_position: int
    progress: float
    iteration: int
    n_iter: int
    step: int
    steps: int
    eta_seconds: float | None
    error: str | None = None
    result: GenerationResponse | None = None
    interrupted: bool = False  # POST /v1/tasks/{id}/interrupt (AUTOMATIC1111's): done with what it had made


class TaskSummary(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    queue_position: int
    progress: float
    step: int
    steps: int
    iteration: int
    n_iter: int
    eta_seconds: float | None
    created: float
    prompt: str
    error: str | None = None
    interrupted: bool = False


class TaskList(BaseModel):
    tasks: list[TaskSummary]  # the caller's own, newest first
    others: dict[str, int]  # everything else queued or running (others' tasks, /sdapi generations), as counts


class ClassifyBody(BaseModel):
    model_config = STRICT
    images: list[str] = Field(min_length=1, description="base64-encoded images (data: URL prefix allowed)")
    top_k: int = Field(5, ge=1, le=1000, description="at most this many labels (a model with fewer classes: all)")


class EmbedBody(BaseModel):
    model_config = STRICT
    images: list[str] = Field(min_length=1, description="base64-encoded images (data: URL prefix allowed)")
    layer: int = Field(-1, description="block whose tokens are returned: 0..depth-1 (0..11 for ViT-B/16), or "
                                       "negative from the end; checked against the served model's depth")
    tokens: bool = False


class UpscalerItem(BaseModel):
    """AUTOMATIC1111's /sdapi/v1/upscalers entry."""

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class ExtrasBody(BaseModel):
    """AUTOMATIC1111's ExtrasBaseRequest (modules/api/models.py): its fields, defaults and ranges. Face restoration
    is refused (kiln has no GFPGAN or CodeFormer); the upscalers kiln.upscale names are checked there."""

    model_config = STRICT
    resize_mode: Literal[0, 1] = 0  # 0: scale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool = True  # AUTOMATIC1111 reads it for folder batches only: the API always answers images
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)  # CodeFormer's, used only with codeformer_visibility > 0
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False  # the order of upscaling and face restoration; without the latter, either is one

    @model_validator(mode="after")
    def _unsupported_extras(self):
        for name, restorer in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
            if getattr(self, name) > 0:
                raise ValueError(f"{name} is not supported by this server: it has no face restorer ({restorer}); "
                                 "send 0")
        return self


class ExtrasSingleImageBody(ExtrasBody):
    image: str = Field("", description="base64 image (data: URL prefix allowed)")


class ExtrasFileData(BaseModel):
    model_config = STRICT
    data: str = Field(description="base64 image (data: URL prefix allowed)")
    name: str = Field(description="the file's name (error messages name the image by it)")


class ExtrasBatchImagesBody(ExtrasBody):
    imageList: list[ExtrasFileData]  # AUTOMATIC1111's name (and required there too)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="the postprocessing infotext as AUTOMATIC1111's HTML paragraph")
    image: str = Field(description="base64 PNG with the `postprocessing` text chunk")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class ControlNetDetectBody(BaseModel):
    """sd-webui-controlnet's /controlnet/detect body; -1 is its preprocessor's default for the three numbers."""

    model_config = STRICT
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False  # a memory hint for model-based preprocessors: kiln's run on the CPU without a model


class ControlNetDetectResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs: the module's map of each input image")
    info: str
