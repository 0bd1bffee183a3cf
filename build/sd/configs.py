"""The Triton models of an SD build: tokenizer, text encoder, UNet, VAE, ControlNets, and the ensembles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from build.convert import Variant
from build.native import DEVICES, GPU_INPUTS, cuda_graph_parameters, native_config
from build.sd.specs import controlnet_components, has_ensemble
from build.specs import ComponentSpec
from build.triton_config import DynamicBatching, EnsembleStep, ModelConfig, Tensor
from kiln import contract as names
from kiln.contract import DEFAULT_MODELS, TILING, SDContract, SDModels
from kiln.runtime.static import StaticPlan

STEP_COMPONENTS = ("unet", "unet_control", "unet" + TILING)  # with the ControlNets: what a denoising step calls


def sd_model_configs(specs: dict[str, ComponentSpec], contract: SDContract, variants: Mapping[str, Variant],
                     max_queue_delay_us: int = 2000, threads: int = 0, step_queue_delay_us: int = 0,
                     triton_backend: str = "python", device: str = "cpu", ov_device: str = "CPU",
                     models: SDModels = DEFAULT_MODELS,
                     static: Mapping[str, StaticPlan] | None = None,
                     channels_last: bool = True, torch_compile: bool = False) -> list[ModelConfig]:
    """Every model of the build; `variants[component]` is what that component's model serves. The contract goes
    into sd_unet's parameters: the service reads what it needs to drive the loop from there. `triton_backend`
    "native" serves the runtime models on NVIDIA's image's own backends (build.native), on `device`.

    The models a denoising step calls wait `step_queue_delay_us` for batching partners (default none: the
    service's step batcher already merges the steps of concurrent requests, so a wait only adds to each
    step); the others `max_queue_delay_us`. `static`: the static-shape plans of a static build's runtime models
    (build.static), by component. `channels_last`: the step models of a float16 torch.export program on CUDA keep
    their convolution weights channels-last; `torch_compile`: those of any torch.export program on CUDA capture their
    CUDA graphs from torch.compile's kernels, compiled when Triton loads them.
    """
    text, decoder, encoder = specs["text_encoder"], specs["vae_decoder"], specs["vae_encoder"]
    tokenizer_model, text_encoder_model, text_encode_model, unet_control_model, postprocess_model, preprocess_model = (
        models(name) for name in (names.SD_TOKENIZER, names.SD_TEXT_ENCODER, names.SD_TEXT_ENCODE,
                                  names.SD_UNET_CONTROL, names.SD_VAE_POSTPROCESS, names.SD_IMAGE_PREPROCESS))
    batching = DynamicBatching(max_queue_delay_microseconds=max_queue_delay_us)
    step_batching = DynamicBatching(max_queue_delay_microseconds=step_queue_delay_us)

    def runtime(component: str) -> dict[str, str]:
        served = variants[component]
        params = {"runtime": served.runtime, "artifact": served.artifact,
                  "inference_precision": served.inference_precision, "threads": str(threads)}
        if served.runtime == "openvino":
            params["ov_device"] = ov_device
        if static and component in static:
            params["static_shapes"] = static[component].to_json()
        step = component in STEP_COMPONENTS or component.startswith("controlnet")
        if served.runtime == "torch" and served.accelerator == "cuda" and step:
            params |= cuda_graph_parameters(specs[component]) | GPU_INPUTS
            if channels_last and served.channels_last:
                params["channels_last"] = "1"
            if torch_compile and served.cuda_program:
                params["torch_compile"] = "1"
        return params

    def served(component: str, config: ModelConfig) -> ModelConfig:
        if triton_backend == "native":
            return native_config(config, variants[component], device, threads, specs[component])
        return replace(config, kind=DEVICES[device])  # the Python backend on a GPU: torch variants (check_target)

    # The LoRA set a request runs with (kiln.lora's spec; absent or "": none), where the build mapped its weights
    lora = (Tensor("lora", "BYTES", (1,), optional=True),) if contract.lora_layers else ()

    def runtime_model(component: str, **extra) -> ModelConfig:
        spec = specs[component]
        step = component in STEP_COMPONENTS or component.startswith("controlnet")
        return served(component, ModelConfig(
            name=models.component(component), outputs=spec.triton_outputs(),
            inputs=spec.triton_inputs() + (lora if component in STEP_COMPONENTS else ()),
            max_batch_size=spec.max_batch_size, dynamic_batching=step_batching if step else batching,
            parameters=runtime(component) | extra))

    hidden = text.outputs[0].shape[-1]
    # SDXL's encoding comes with the pooled text (the second encoder's projection), for the UNet's added conditions
    pooled = (Tensor("pooled", "FP32", (-1, text.outputs[1].shape[-1])),) if contract.time_ids else ()
    ids = Tensor("input_ids", "INT64", (-1, text.inputs[0].shape[1]))
    chunks = Tensor("chunks", "INT32", (1,))
    weights = Tensor("weights", "FP32", (-1, text.inputs[0].shape[1]))  # each position's emphasis
    images = Tensor("image", "UINT8", (-1, -1, 3))
    image_bytes, size = Tensor("image", "BYTES", (1,)), Tensor("size", "INT32", (2,))
    clip_skip, row_clip_skip = Tensor("clip_skip", "INT32", (1,)), Tensor("clip_skip", "INT64", (-1,))
    # The textual-inversion embeddings a request's prompts may name (zero of each when none), sent by the service
    embeddings = (Tensor("embedding_names", "BYTES", (-1,)), Tensor("embedding_sizes", "INT32", (-1,)),
                  Tensor("embedding_vectors", "FP32", (-1, hidden)))
    prompts = (Tensor("prompt", "BYTES", (-1,)), clip_skip, *embeddings)
    token_vectors = Tensor("token_vectors", "FP32", (-1, hidden))
    configs = [
        ModelConfig(name=tokenizer_model, inputs=prompts,
                    outputs=(ids, chunks, weights, row_clip_skip, token_vectors),  # clip skip for every row of ids
                    parameters={"max_chunks": str(contract.max_prompt_chunks),
                                "clip_skip_layers": str(contract.clip_skip_layers),
                                "textual_inversion_dim": str(contract.textual_inversion_dim)}),
        served("text_encoder", ModelConfig(name=text_encoder_model, inputs=text.triton_inputs(batched=False) + lora,
                                           outputs=text.triton_outputs(batched=False),
                                           parameters=runtime("text_encoder"))),
        runtime_model("unet", **contract.to_parameters()),
        runtime_model("vae_decoder"),
        ModelConfig(name=postprocess_model, inputs=(Tensor("decoded", "FP32", (3, -1, -1)),), outputs=(images,),
                    max_batch_size=decoder.max_batch_size, dynamic_batching=batching),
        runtime_model("vae_encoder"),
        ModelConfig(name=preprocess_model, inputs=(image_bytes, size),
                    outputs=(Tensor("pixels", "FP32", (3, -1, -1)),), max_batch_size=encoder.max_batch_size,
                    parameters={"min_size": str(contract.min_size), "max_size": str(contract.max_size)}),
        ModelConfig(name=text_encode_model, backend=None, platform="ensemble", inputs=prompts + lora,
                    outputs=(Tensor("embeddings", "FP32", (-1, text.inputs[0].shape[1], hidden)), chunks, weights,
                             *pooled),
                    steps=(EnsembleStep(tokenizer_model, {t.name: t.name for t in prompts},
                                        {"input_ids": "input_ids", "chunks": "chunks", "weights": "weights",
                                         "clip_skip": "row_clip_skip", "token_vectors": "token_vectors"}),
                           EnsembleStep(text_encoder_model, {"input_ids": "input_ids", "clip_skip": "row_clip_skip",
                                                                "token_vectors": "token_vectors"}
                                        | {t.name: t.name for t in lora},
                                        {"last_hidden_state": "embeddings"}
                                        | ({"pooler_output": "pooled"} if pooled else {})))),
    ]

    def vae_models(suffix: str) -> list[ModelConfig]:
        """A VAE's decode and encode ensembles (the checkpoint's own, suffix "", or the build's extra VAEs)."""
        vae = models.vae(suffix)
        return [
            ModelConfig(name=vae["decode"], backend=None, platform="ensemble", max_batch_size=decoder.max_batch_size,
                        inputs=(Tensor("latent", "FP32", decoder.inputs[0].triton_tensor().dims),), outputs=(images,),
                        steps=(EnsembleStep(vae["decoder"], {"latent": "latent"}, {"image": "decoded"}),
                               EnsembleStep(postprocess_model, {"decoded": "decoded"}, {"image": "image"}))),
            ModelConfig(name=vae["encode"], backend=None, platform="ensemble", max_batch_size=encoder.max_batch_size,
                        inputs=(image_bytes, size),
                        outputs=(Tensor("moments", "FP32", encoder.outputs[0].triton_tensor().dims),),
                        steps=(EnsembleStep(preprocess_model, {"image": "image", "size": "size"},
                                            {"pixels": "pixels"}),
                               EnsembleStep(vae["encoder"], {"image": "pixels"}, {"moments": "moments"})))]

    configs += vae_models("")
    for suffix in [v.suffix for v in contract.vaes] + ([TILING] if contract.tiling else []):
        configs += [runtime_model("vae_decoder" + suffix), runtime_model("vae_encoder" + suffix), *vae_models(suffix)]
    if contract.tiling:
        configs.append(runtime_model("unet" + TILING))
    controls = controlnet_components(specs)
    if controls:
        configs.append(runtime_model("unet_control"))
    unet_control = specs["unet_control"]
    for index, name in enumerate(controls):  # every ControlNet feeds the one sd_unet_control
        control = specs[name]
        configs.append(runtime_model(name))
        if has_ensemble(specs, name):  # ControlNet -> UNet: a fixed graph, so an ensemble; the residuals stay in Triton
            configs.append(ModelConfig(
                name=models.controlnet_ensemble(index), backend=None, platform="ensemble",
                max_batch_size=unet_control.max_batch_size,
                inputs=tuple(replace(t, reshape=None) for t in control.triton_inputs()) + lora,
                outputs=unet_control.triton_outputs(),
                steps=(EnsembleStep(models.component(name), {t.name: t.name for t in control.inputs},
                                    {t.name: t.name for t in control.outputs}),
                       EnsembleStep(unet_control_model, {t.name: t.name for t in (*unet_control.inputs, *lora)},
                                    {"noise_pred": "noise_pred"}))))
    return configs
