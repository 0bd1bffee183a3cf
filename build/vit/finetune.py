"""`kiln finetune vit`: a timm ViT fine-tuned on a user's labelled images, written as a folder `kiln build vit` serves.

timm's own pieces make the recipe: its train/eval transforms (RandAugment, mixup/cutmix where asked), its optimizer
factory with layer-wise learning-rate decay, its cosine schedule with warm-up, label smoothing, and its EMA of the
weights. Around them: freezing the first N blocks, bf16 autocast where the CPU has bf16 instructions and fp16 on a
GPU, gradient accumulation, early stopping on validation accuracy, resume from the run's own checkpoint, a memory
check before the first step, a progress bar per epoch, metrics.json and a plot of the curves.

The output folder: model.safetensors + config.json (architecture, num_classes, label_names, the preprocessing), the
split (split.json), metrics.json, curves.png and checkpoint.pt (the resume state, read back weights-only).
"""

from __future__ import annotations

import difflib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from build.vit import dataset
from build.vit.resources import check_memory, pick_device, pick_precision
from build.vit.spec import VIT_MODEL_NAME, spec_facts, spec_for
from kiln.errors import ConfigError
from kiln.machine import machine

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class FinetuneOptions:
    data: Path  # a folder of class folders, or a CSV of path,label
    out: Path
    model: str = VIT_MODEL_NAME  # a timm model name (its pretrained tag chooses the starting weights)
    weights: str | None = None  # start from this folder/.safetensors/hub id instead of timm's pretrained download
    random_init: bool = False  # start from seeded random weights (no download; tests, or training from scratch)
    epochs: int = 10
    batch_size: int = 32
    accumulate: int = 1  # optimizer step every N batches (effective batch = batch_size * accumulate)
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float | None = 0.75  # timm's layer-wise lr decay (None: one lr for every layer)
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    auto_augment: str | None = "rand-m9-mstd0.5"  # timm's RandAugment spec; None: none
    color_jitter: float = 0.4
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    freeze_blocks: int = 0  # keep the patch embedding and the first N blocks as they are
    ema: float | None = None  # EMA decay of the weights (e.g. 0.999); the better of model and EMA is kept
    patience: int | None = None  # stop after this many epochs without a better validation accuracy
    val_fraction: float = 0.2
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the CPU has it, fp16 on CUDA), fp32, bf16, fp16
    device: str = "auto"  # auto, cpu, cuda
    resume: bool = False  # continue the run in `out` from its checkpoint.pt
    max_bad_images: float = 0.05  # fraction of unreadable images that may be skipped
    max_memory_gb: float | None = None  # memory the run may use (default: what the device has free)
    workers: int = 0  # data-loading processes
    progress: bool = True


@dataclass
class FinetuneResult:
    out: Path
    classes: list[str]
    best_accuracy: float
    best_epoch: int
    kept: str  # "model" or "ema": whose weights were written
    metrics: dict


def finetune_vit(options: FinetuneOptions, log: Callable[[str], None] = print) -> FinetuneResult:
    """Train, validate every epoch, keep the best weights; raise a KilnError subclass with a clear message."""
    _check_options(options)
    out = Path(options.out)
    device = pick_device(options.device)
    precision = pick_precision(options.precision, device)

    # 1. The data: read, open every image, split (stratified, seeded).
    classes, pairs = dataset.read_labelled(options.data)
    bar = (lambda items: tqdm(items, desc="check images", unit="image", leave=False)) if options.progress else None
    good, bad = dataset.check_images(pairs, options.max_bad_images, bar)
    if bad:
        log(f"skipped {len(bad)} unreadable image(s) of {len(pairs)} (listed in split.json)")
    split = dataset.split(classes, good, options.val_fraction, options.seed, bad)

    # 2. The model, its classifier sized for these classes; a resumed run's state.
    state = _resume_state(out, options, classes) if options.resume else None
    for seed in (torch.manual_seed, random.seed, np.random.seed):  # torch's; timm's random crops'; RandAugment's
        seed(options.seed)  # a repeatable run: every generator the training draws from
    model = _create_model(options, len(classes), log, resuming=state is not None)
    facts = spec_facts(spec_for(model))  # refuses what kiln cannot serve, before any training
    frozen = _freeze(model, options.freeze_blocks)
    model.to(device)
    check_memory(model, facts, options, device, precision)

    import timm.data
    import timm.optim
    import timm.scheduler

    data_config = timm.data.resolve_data_config(model=model)
    train_tf = timm.data.create_transform(**data_config, is_training=True, auto_augment=options.auto_augment,
                                          color_jitter=options.color_jitter)
    eval_tf = timm.data.create_transform(**data_config, is_training=False)
    mixing = options.mixup > 0 or options.cutmix > 0
    generator = torch.Generator().manual_seed(options.seed)
    train_loader = torch.utils.data.DataLoader(
        _Images(split.train, train_tf), batch_size=options.batch_size, shuffle=True, generator=generator,
        num_workers=options.workers, drop_last=mixing and len(split.train) >= options.batch_size)
    val_loader = torch.utils.data.DataLoader(_Images(split.val, eval_tf), batch_size=options.batch_size,
                                             num_workers=options.workers)
    updates_per_epoch = max(1, math.ceil(len(train_loader) / options.accumulate))
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=options.lr, weight_decay=options.weight_decay,
                                               layer_decay=options.layer_decay)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=options.epochs, warmup_epochs=options.warmup_epochs,
        warmup_lr=options.lr * 0.01, min_lr=options.lr * 0.01, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    mixup = timm.data.Mixup(mixup_alpha=options.mixup, cutmix_alpha=options.cutmix,
                            label_smoothing=options.label_smoothing, num_classes=len(classes)) if mixing else None
    criterion = _criterion(mixing, options.label_smoothing)
    ema = None
    if options.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=options.ema, use_warmup=True)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    history, best = [], {"accuracy": -1.0, "epoch": -1, "kept": "model"}
    start_epoch, updates = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        history, best = json.loads(state["history"]), json.loads(state["best"])
        start_epoch, updates = int(state["epoch"]), int(state["updates"])
        log(f"resumed {out / CHECKPOINT} after epoch {start_epoch} (best accuracy {best['accuracy']:.3f})")
    out.mkdir(parents=True, exist_ok=True)
    split.write(out / "split.json")
    log(f"fine-tuning {options.model} on {len(split.train)} images ({len(classes)} classes: {', '.join(classes)}), "
        f"validating on {len(split.val)}; {device}, {precision}; {frozen} parameters frozen")

    # 3. Epochs: train, validate, keep the best, checkpoint, stop early when asked.
    stale = 0
    for epoch in range(start_epoch, options.epochs):
        train = _train_epoch(model, train_loader, optimizer, scheduler, criterion, mixup, ema, scaler, device,
                             precision, options, epoch, updates)
        updates = train.pop("updates")
        scores = {"model": _evaluate(model, val_loader, device, precision)}
        if ema is not None:
            scores["ema"] = _evaluate(ema.module, val_loader, device, precision)
        kept = max(scores, key=lambda k: scores[k]["accuracy"])
        row = {"epoch": epoch + 1, **train, **{f"val_{k}": v for k, v in scores["model"].items()},
               "lr": optimizer.param_groups[-1]["lr"]}
        if ema is not None:
            row |= {f"ema_val_{k}": v for k, v in scores["ema"].items()}
        history.append(row)
        if scores[kept]["accuracy"] > best["accuracy"]:
            best, stale = {"accuracy": scores[kept]["accuracy"], "epoch": epoch + 1, "kept": kept}, 0
            _save_model(ema.module if kept == "ema" else model, options.model, classes, out)
        else:
            stale += 1
        log(f"epoch {epoch + 1}/{options.epochs}: loss {train['train_loss']:.4f}, train acc "
            f"{train['train_accuracy']:.3f}, val acc {scores['model']['accuracy']:.3f}"
            + (f" (ema {scores['ema']['accuracy']:.3f})" if ema is not None else "")
            + f", {train['images_per_s']:.1f} images/s")
        _save_checkpoint(out, model, optimizer, ema, epoch + 1, updates, history, best, classes, options)
        if options.patience is not None and stale >= options.patience:
            log(f"early stop: no better validation accuracy for {stale} epochs")
            break

    metrics = {"model": options.model, "classes": classes, "train_images": len(split.train),
               "val_images": len(split.val), "skipped_images": len(split.skipped), "device": str(device),
               "precision": precision, "frozen_parameters": frozen, "shape": facts, "best": best,
               "chance_accuracy": 1 / len(classes), "history": history, "machine": machine(),
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(history, out / "curves.png", options.model)
    return FinetuneResult(out, classes, best["accuracy"], best["epoch"], best["kept"], metrics)


# -- the loop --------------------------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __init__(self, samples: list[dataset.Sample], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        sample = self.samples[index]
        with Image.open(sample.path) as image:
            return self.transform(image.convert("RGB")), sample.label


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _train_epoch(model, loader, optimizer, scheduler, criterion, mixup, ema, scaler, device, precision,
                 options: FinetuneOptions, epoch: int, updates: int) -> dict:
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", unit="batch", disable=not options.progress,
               leave=False)
    optimizer.zero_grad(set_to_none=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = images.to(device), labels.to(device)
        targets = labels
        if mixup is not None and len(images) % 2 == 0:
            images, targets = mixup(images, labels)
        try:
            with _autocast(device, precision):
                logits = model(images)
                loss = criterion(logits, targets) / options.accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError) or "allocate" in str(exc):
                raise ConfigError(f"out of memory at batch size {options.batch_size}: try --batch-size "
                                  f"{max(1, options.batch_size // 2)} --accumulate {options.accumulate * 2} "
                                  "(the same effective batch)") from None
            raise
        last = step + 1 == len(loader)
        if (step + 1) % options.accumulate == 0 or last:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            scheduler.step_update(num_updates=updates)
            if ema is not None:
                ema.update(model, step=updates)
        total_loss += float(loss.detach()) * options.accumulate * len(images)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(images)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "images_per_s": seen / seconds, "seconds": seconds, "updates": updates}


@torch.inference_mode()
def _evaluate(model, loader, device, precision) -> dict:
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with _autocast(device, precision):
            logits = model(images).float()
        loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(images)
    return {"loss": loss / seen, "accuracy": correct / seen}


def _criterion(mixing: bool, smoothing: float):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()  # Mixup makes the smoothed, mixed targets
    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else torch.nn.CrossEntropyLoss()


# -- the model -------------------------------------------------------------------------------------------------------
def _create_model(options: FinetuneOptions, classes: int, log: Callable[[str], None],
                  resuming: bool = False) -> torch.nn.Module:
    """The model to train: from --weights, seeded random, or timm's pretrained download (a resumed run loads its own
    checkpoint over the architecture, so it downloads nothing)."""
    import timm

    architecture = options.model.split(".")[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models("*vit*"), n=3)
        raise ConfigError(f"timm knows no model {options.model!r}" + (f"; did you mean {', '.join(close)}?"
                                                                     if close else ""))
    if options.weights is not None:
        from build.vit.weights import load_vit

        model = load_vit(options.weights, model_name=options.model).model
    elif options.random_init or resuming:
        model = timm.create_model(options.model, pretrained=False)
        if not resuming:
            log(f"!! --random-init: {options.model} starts from seeded random weights, not from its pretrained ones")
    else:
        try:
            model = timm.create_model(options.model, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - no network, unknown tag, gated repo: all different types
            raise ConfigError(
                f"cannot fetch the pretrained weights of {options.model} ({type(exc).__name__}); without network "
                "access, start from a local timm folder with --weights DIR (or --random-init)") from None
    if model.num_classes != classes:
        model.reset_classifier(classes)
    return model


def _freeze(model, blocks: int) -> int:
    """Freeze the embeddings and the first `blocks` blocks; the number of parameters frozen."""
    if blocks > len(model.blocks):
        raise ConfigError(f"--freeze-blocks {blocks}: the model has {len(model.blocks)} blocks")
    if not blocks:
        return 0
    frozen = [model.patch_embed, *model.blocks[:blocks]]
    parameters = [p for module in frozen for p in module.parameters()]
    parameters += [p for name in ("cls_token", "reg_token", "pos_embed")
                   if isinstance(p := getattr(model, name, None), torch.nn.Parameter)]
    for p in parameters:
        p.requires_grad = False
    return int(sum(p.numel() for p in parameters))


def _save_model(model, model_name: str, classes: list[str], out: Path) -> None:
    from build.vit.weights import save_vit_checkpoint

    save_vit_checkpoint(model, out, model_name, labels=classes)


def _save_checkpoint(out: Path, model, optimizer, ema, epoch, updates, history, best, classes, options) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "updates": updates,
             "history": json.dumps(history), "best": json.dumps(best), "classes": list(classes),
             "model_name": options.model}
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    torch.save(state, out / (CHECKPOINT + ".tmp"))
    (out / (CHECKPOINT + ".tmp")).replace(out / CHECKPOINT)


def _resume_state(out: Path, options: FinetuneOptions, classes: list[str]) -> dict | None:
    path = out / CHECKPOINT
    if not path.exists():
        raise ConfigError(f"--resume: {path} does not exist (nothing to resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: nothing runs
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files raise several types
        raise ConfigError(f"--resume: {path} is not a kiln finetune checkpoint ({type(exc).__name__})") from None
    if state.get("classes") != classes:
        raise ConfigError(f"--resume: the checkpoint was trained on classes {state.get('classes')}, the data now has "
                          f"{classes}: start a new run in another --out folder")
    if state.get("model_name") != options.model:
        raise ConfigError(f"--resume: the checkpoint is of {state.get('model_name')}, not {options.model}")
    if int(state["epoch"]) >= options.epochs:
        raise ConfigError(f"--resume: the run already finished its {state['epoch']} epochs; raise --epochs")
    return state


# -- checks ----------------------------------------------------------------------------------------------------------
def _check_options(options: FinetuneOptions) -> None:
    for name in ("epochs", "batch_size", "accumulate"):
        if getattr(options, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
    if options.weights is not None and options.random_init:
        raise ConfigError("give --weights or --random-init, not both")
    if options.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {options.precision!r}")
    if options.auto_augment and "-inc1" in options.auto_augment:
        # timm's increasing posterize reaches 0 bits at high magnitudes, which this Pillow refuses mid-epoch
        raise ConfigError(f"--auto-augment {options.auto_augment}: the increasing ops (inc1) posterize to 0 bits at "
                          "high magnitudes, which Pillow 13 refuses; use the same policy without -inc1")
    if not 0 <= options.max_bad_images < 1:
        raise ConfigError(f"--max-bad-images is a fraction in [0, 1), got {options.max_bad_images}")


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train and validation, in one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss_axis.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    accuracy_axis.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    accuracy_axis.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    if history and "ema_val_accuracy" in history[0]:
        accuracy_axis.plot(epochs, [r["ema_val_accuracy"] for r in history], "o--", label="validation (EMA)")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.05))
    for axis in (loss_axis, accuracy_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(f"kiln finetune {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
