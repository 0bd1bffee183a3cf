"""Where the project's own files are: the sample images and the default model repository."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = PROJECT_ROOT / "assets" / "images"  # photographs for parity checks, calibration and the demo
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"  # hand-written models live here; builds write beside them
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """The images of a folder (by suffix), sorted; a clear error when there are none."""
    if not Path(folder).is_dir():
        raise ConfigError(f"{folder}: not a folder of images")
    images = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images
