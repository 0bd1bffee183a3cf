"""Numerical comparison of an artifact's outputs with PyTorch's, and the tolerance check."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from build.specs import Tolerance
from kiln.errors import ParityError


@dataclass(frozen=True)
class Parity:
    """How one output of an artifact compares with the reference, over a set of samples."""

    max_abs: float
    mean_abs: float
    cosine: float  # of the flattened outputs, worst sample
    top1: float | None = None  # fraction of samples whose arg-max agrees

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def compare(reference: np.ndarray, candidate: np.ndarray, *, classify: bool = False) -> Parity:
    """Compare two batches (leading axis = samples)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise ParityError(f"shape mismatch: reference {ref.shape}, artifact {out.shape}")
    diff = np.abs(ref - out)
    flat_ref = ref.reshape(ref.shape[0], -1)
    flat_out = out.reshape(out.shape[0], -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_out, axis=1)
    cosines = np.sum(flat_ref * flat_out, axis=1) / np.maximum(norms, 1e-30)
    # Two all-zero outputs are identical, not orthogonal.
    both_zero = (np.abs(flat_ref).max(axis=1) == 0) & (np.abs(flat_out).max(axis=1) == 0)
    cosines = np.where(both_zero, 1.0, cosines)
    top1 = float(np.mean(flat_ref.argmax(1) == flat_out.argmax(1))) if classify else None
    return Parity(max_abs=float(diff.max()), mean_abs=float(diff.mean()), cosine=float(cosines.min()), top1=top1)


def psnr(reference: np.ndarray, candidate: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio of two images (uint8 by default), in dB; inf when identical."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(candidate, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def compare_outputs(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                    classify: frozenset[str] | set[str] = frozenset()) -> dict[str, Parity]:
    """`compare` for every output the reference has; top-1 agreement for the names in `classify`."""
    return {name: compare(ref, outputs[name], classify=name in classify) for name, ref in reference.items()}


def check(name: str, parity: Parity, tolerance: Tolerance) -> None:
    """Raise ParityError naming every figure outside `tolerance`."""
    problems = []
    if parity.cosine < tolerance.min_cosine:
        problems.append(f"cosine {parity.cosine:.6f} < {tolerance.min_cosine}")
    if tolerance.max_abs is not None and parity.max_abs > tolerance.max_abs:
        problems.append(f"max abs diff {parity.max_abs:.3g} > {tolerance.max_abs}")
    if tolerance.min_top1 is not None and parity.top1 is not None and parity.top1 < tolerance.min_top1:
        problems.append(f"top-1 agreement {parity.top1:.3f} < {tolerance.min_top1}")
    if problems:
        raise ParityError(f"{name} is outside its tolerance ({'; '.join(problems)}); "
                          f"tolerance rationale: {tolerance.why}. The artifact was removed.")
