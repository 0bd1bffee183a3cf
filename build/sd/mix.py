"""What each component of an SD build runs: one variant for all, and parts that run another (`KEY+PART=KEY...`).

`openvino-int8-hybrid+vae=openvino-bf16` serves the UNet (and the ControlNets, which add to its inputs) in the
calibrated int8 variant and every VAE model in bf16: the VAE is where int8 weights save the least (its activations
stay in float32) and bf16 arithmetic the most. One string names the whole choice everywhere: `kiln build sd
--variant`, the contract (sd_unet's parameters), the build report, `kiln bench sd --variants`. `auto`, first or for
a part, is the build's to choose by timing the candidates (build.sd.auto); the chosen mix names no auto.
"""

from __future__ import annotations

from dataclasses import dataclass

from build.convert import SD_VARIANTS, Variant
from kiln.errors import ConfigError

# The parts a mix can give another variant, and the components each covers (their names in build.sd.build)
PARTS = {"text_encoder": "the text encoder, both of SDXL's",
         "vae": "every VAE model: decoders and encoders, the extra VAEs and the tiling ones"}
CALIBRATED = ("unet",)  # components whose real inputs a build can capture (a calibrated variant quantizes them so)
AUTO = "auto"


def part_of(component: str) -> str:
    """The part a component belongs to ("" for the UNet's: the UNet, its tiling twin, the ControlNets)."""
    if component == "text_encoder":
        return "text_encoder"
    return "vae" if component.startswith("vae_") else ""


@dataclass(frozen=True)
class Mix:
    """A base variant (a key of SD_VARIANTS, or auto before the build chooses) and the parts that run another."""

    base: str
    parts: tuple[tuple[str, str], ...] = ()  # (part, key), in PARTS' order

    @property
    def label(self) -> str:
        return "+".join((self.base, *(f"{part}={key}" for part, key in self.parts)))

    def key(self, component: str) -> str:
        return dict(self.parts).get(part_of(component), self.base)

    def variant(self, component: str) -> Variant:
        """What `component` serves: its part's variant, calibrated for the components a build captures inputs of,
        int8 weights instead for the others (Variant.uncalibrated)."""
        kind = SD_VARIANTS[self.key(component)]
        return kind if component in CALIBRATED else kind.uncalibrated()

    def keys(self) -> tuple[str, ...]:
        """Every variant key it names (the base first)."""
        return tuple(dict.fromkeys((self.base, *(key for _, key in self.parts))))

    def auto_parts(self) -> tuple[str, ...]:
        """The parts the build chooses by timing ("" for the first variant's)."""
        return tuple(part for part, key in (("", self.base), *self.parts) if key == AUTO)

    def choose(self, part: str, key: str) -> Mix:
        """This mix with `key` for `part` ("": the first variant), in one spelling: a part that serves what the base
        would serve there is dropped (outside the UNet a calibrated key means its int8 weights, so
        openvino-int8-hybrid+vae=openvino-int8 is openvino-int8-hybrid); a part to choose stays (auto+vae=auto times
        the VAE on its own)."""
        base, parts = (key, dict(self.parts)) if not part else (self.base, dict(self.parts) | {part: key})
        return Mix(base, tuple((name, parts[name]) for name in PARTS
                               if name in parts and not _same_outside_the_unet(parts[name], base)))


def _same_outside_the_unet(key: str, base: str) -> bool:
    if AUTO in (key, base):
        return False
    return SD_VARIANTS[key].uncalibrated() == SD_VARIANTS[base].uncalibrated()


def parse_mix(text: str, allow_auto: bool = True) -> Mix:
    """`KEY` or `KEY+PART=KEY+...`; ConfigError naming what is wrong."""
    base, *assignments = (piece.strip() for piece in str(text).split("+"))
    valid = ", ".join(SD_VARIANTS)
    if base not in SD_VARIANTS and not (allow_auto and base == AUTO):
        raise ConfigError(f"unknown SD variant {base!r}; valid: {AUTO + ', ' if allow_auto else ''}{valid}, each "
                          f"optionally followed by +PART=VARIANT (PART: {', '.join(PARTS)})")
    parts: dict[str, str] = {}
    for assignment in assignments:
        part, sep, key = (piece.strip() for piece in assignment.partition("="))
        if not sep or part not in PARTS:
            raise ConfigError(f"variant {text!r}: {assignment!r} is not PART=VARIANT with PART one of "
                              + "; ".join(f"{name} ({what})" for name, what in PARTS.items())
                              + " (the UNet and the ControlNets run the first variant)")
        if part in parts:
            raise ConfigError(f"variant {text!r} names {part} twice")
        if key not in SD_VARIANTS and not (allow_auto and key == AUTO):
            raise ConfigError(f"variant {text!r}: unknown variant {key!r} for {part}; valid: "
                              f"{AUTO + ', ' if allow_auto else ''}{valid}")
        parts[part] = key
    mix = Mix(base)
    for part, key in parts.items():
        mix = mix.choose(part, key)
    return mix
