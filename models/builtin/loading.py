"""Loading the shipped built-in checkpoint (safetensors + JSON, nothing unpickled)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import WEIGHTS_DIR, load_config, load_state
from .dit import DiT, DiTConfig

DIT_PATH = WEIGHTS_DIR / "dit.safetensors"


def load_dit(path: Path = DIT_PATH) -> DiT:
    meta = load_config(path)
    return load_state(DiT(DiTConfig(**meta["config"])), path).eval()


def default_guidance(path: Path = DIT_PATH) -> float:
    """The guidance scale the model card recommends, stored beside the weights."""
    return float(load_config(path).get("default_guidance", 3.0))


def default_noise_scale(path: Path = DIT_PATH) -> float:
    """The initial noise scale the model card recommends (absent: 1, unscaled noise)."""
    return float(load_config(path).get("noise_scale", 1.0))
