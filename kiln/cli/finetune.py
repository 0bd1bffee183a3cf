"""`kiln finetune vit`: fine-tune a timm ViT on a folder of labelled images into a folder `kiln build vit` serves;
`kiln finetune example-data`: a small labelled folder made from the shipped photographs, to try it on."""

from __future__ import annotations

from pathlib import Path


def add_parser(commands) -> None:
    finetune = commands.add_parser("finetune", help="fine-tune a classifier on your own labelled images")
    targets = finetune.add_subparsers(dest="target", required=True)
    vit = targets.add_parser("vit", help="a timm ViT (any size timm has: Tiny to Large, patch 14/16, 224/384) on an "
                                         "image folder; writes model.safetensors + config.json with your labels")
    vit.add_argument("--data", type=Path, required=True,
                     help="a folder with one sub-folder of images per class (its name is the label), or a CSV of "
                          "path,label (paths relative to the CSV)")
    vit.add_argument("--out", type=Path, required=True, help="folder to write (kiln build vit --weights OUT)")
    vit.add_argument("--model", default="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                     help="timm model name; its pretrained weights are the start (default: %(default)s)")
    start = vit.add_mutually_exclusive_group()
    start.add_argument("--weights", help="start from a local timm folder, .safetensors file or hub id instead of "
                                         "downloading --model's pretrained weights")
    start.add_argument("--random-init", action="store_true", help="start from seeded random weights (no download)")
    vit.add_argument("--epochs", type=int, default=10)
    vit.add_argument("--batch-size", type=int, default=32)
    vit.add_argument("--accumulate", type=int, default=1, help="gradient accumulation: an optimizer step every N "
                                                               "batches")
    vit.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, cosine schedule)")
    vit.add_argument("--weight-decay", type=float, default=0.05)
    vit.add_argument("--layer-decay", type=float, default=0.75,
                     help="timm's layer-wise learning-rate decay (1: the same rate for every layer)")
    vit.add_argument("--warmup-epochs", type=int, default=1)
    vit.add_argument("--label-smoothing", type=float, default=0.1)
    vit.add_argument("--auto-augment", default="rand-m9-mstd0.5",
                     help="timm's augmentation policy (RandAugment spec), or 'none' (default: %(default)s)")
    vit.add_argument("--color-jitter", type=float, default=0.4, help="0 turns it off")
    vit.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (e.g. 0.8; 0: off)")
    vit.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (e.g. 1.0; 0: off)")
    vit.add_argument("--freeze-blocks", type=int, default=0, help="train only the blocks after the first N")
    vit.add_argument("--ema", type=float, help="keep an EMA of the weights with this decay (e.g. 0.999); the better "
                                               "of the model and its EMA on validation is written")
    vit.add_argument("--patience", type=int, help="stop after this many epochs without a better validation accuracy")
    vit.add_argument("--val-fraction", type=float, default=0.2, help="of each class, held out for validation")
    vit.add_argument("--seed", type=int, default=0)
    vit.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="auto: bf16 autocast where the CPU has bf16 instructions, fp16 on a GPU, otherwise fp32")
    vit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    vit.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    vit.add_argument("--max-bad-images", type=float, default=0.05,
                     help="fraction of unreadable images skipped (and counted) before the run is refused")
    vit.add_argument("--max-memory-gb", type=float, help="memory the run may use (default: what is free)")
    vit.add_argument("--workers", type=int, default=0, help="data-loading processes")
    vit.set_defaults(run=run_vit)
    example = targets.add_parser("example-data", help="three classes (warm, cool, gray) made from the shipped "
                                                      "photographs: a folder to try kiln finetune vit on")
    example.add_argument("out", type=Path)
    example.add_argument("--per-class", type=int, default=12)
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(run=run_example)


def run_vit(args) -> int:
    from build.vit.finetune import FinetuneOptions, finetune_vit

    result = finetune_vit(FinetuneOptions(
        data=args.data, out=args.out, model=args.model, weights=args.weights, random_init=args.random_init,
        epochs=args.epochs, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
        weight_decay=args.weight_decay, layer_decay=None if args.layer_decay == 1 else args.layer_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        auto_augment=None if args.auto_augment == "none" else args.auto_augment, color_jitter=args.color_jitter,
        mixup=args.mixup, cutmix=args.cutmix, freeze_blocks=args.freeze_blocks, ema=args.ema, patience=args.patience,
        val_fraction=args.val_fraction, seed=args.seed, precision=args.precision, device=args.device,
        resume=args.resume, max_bad_images=args.max_bad_images, max_memory_gb=args.max_memory_gb,
        workers=args.workers))
    print(f"best validation accuracy {result.best_accuracy:.3f} at epoch {result.best_epoch} ({result.kept} weights; "
          f"chance is {1 / len(result.classes):.3f})")
    print(f"wrote {result.out} (model.safetensors, config.json, metrics.json, curves.png); serve it with:")
    print(f"  kiln build vit --weights {result.out}")
    return 0


def run_example(args) -> int:
    from build.vit.dataset import EXAMPLE_CLASSES, write_example_dataset

    out = write_example_dataset(args.out, args.per_class, args.seed)
    print(f"wrote {args.per_class} images of each of {', '.join(EXAMPLE_CLASSES)} to {out}")
    return 0
