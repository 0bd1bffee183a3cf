"""Where and how `kiln finetune vit` trains: the device, the precision, and whether a batch fits in memory."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kiln.errors import ConfigError
from kiln.machine import machine


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """auto: fp16 on CUDA, bf16 where the CPU has bf16 instructions (AVX-512 BF16 or AMX), otherwise fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if any("bf16" in f for f in machine()["isa"]) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 trains on a CUDA GPU only; on the CPU use bf16 or fp32")
    return name


def check_memory(model, facts: dict, options, device, precision: str) -> None:
    """Refuse a batch that cannot fit, naming one that would: weights, gradients and AdamW's state at 16 bytes a
    parameter, plus the activations a transformer block keeps for the backward pass (Korthikanti et al., 2022:
    tokens * width * (34 + 5 * heads * tokens / width) bytes a block at 16 bits, twice that in fp32)."""
    available = options.max_memory_gb * 2**30 if options.max_memory_gb else free_memory(device)
    if available is None:
        return
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = 4 * sum(p.numel() for p in model.parameters()) + 12 * trainable + (4 * trainable if options.ema else 0)
    heads = getattr(model.blocks[0].attn, "num_heads", 12)
    tokens, width = facts["tokens"], facts["width"]
    per_block = tokens * width * (34 + 5 * heads * tokens / width) * (1 if precision in ("bf16", "fp16") else 2)
    trained_blocks = facts["blocks"] - options.freeze_blocks
    per_image = per_block * max(trained_blocks, 1)
    need = fixed + per_image * options.batch_size
    if need > available:
        fits = int((available - fixed) // per_image)
        advice = (f"--batch-size {fits} (with --accumulate {math.ceil(options.batch_size / fits)} for the same "
                  "effective batch)") if fits >= 1 else "a smaller model or --freeze-blocks"
        raise ConfigError(f"batch size {options.batch_size} needs about {need / 2**30:.1f} GiB to train "
                          f"{options.model}, and {available / 2**30:.1f} GiB is available: {advice} would fit")


def free_memory(device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None
