"""The ViT's preprocessing, resolved from timm's own eval transform for the model (its pretrained_cfg)."""

from __future__ import annotations

from kiln.errors import ConfigError
from kiln.imaging import RESAMPLE, EvalTransform


def eval_transform(model) -> EvalTransform:
    """timm's eval transform for `model` as the torch-free EvalTransform the preprocess model runs."""
    import timm.data
    from torchvision import transforms as T

    config = timm.data.resolve_data_config(model=model)
    pipeline = timm.data.create_transform(**config, is_training=False)
    resize = crop = interpolation = mean = std = None
    for step in pipeline.transforms:
        if isinstance(step, T.Resize):
            if not isinstance(step.size, int) and len(step.size) != 1:
                raise ConfigError(f"unsupported Resize size {step.size!r}: only short-side resizing is implemented")
            resize = step.size if isinstance(step.size, int) else step.size[0]
            interpolation = step.interpolation.value
        elif isinstance(step, T.CenterCrop):
            crop = tuple(int(v) for v in step.size)
        elif isinstance(step, T.Normalize):
            mean = tuple(float(v) for v in step.mean)
            std = tuple(float(v) for v in step.std)
        elif type(step).__name__ not in ("MaybeToTensor", "ToTensor"):
            raise ConfigError(f"unsupported step {step!r} in timm's eval transform")
    if None in (resize, crop, interpolation, mean, std):
        raise ConfigError(f"timm's eval transform {pipeline} lacks resize, crop or normalize")
    if interpolation not in RESAMPLE:
        raise ConfigError(f"unsupported interpolation {interpolation!r}")
    return EvalTransform(resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std)
