"""Reading LoRA adapters: diffusers / PEFT safetensors (as `save_lora_weights` writes
them), kohya-style files through diffusers' own converters, into per-module low-rank
pairs ready for the batched forward.

A module's update is  W x + scale * (alpha / r) * B (A x).  The (alpha / r) factor is
folded into B here, so the forward multiplies by the request's scale alone. Alpha
comes from the file's PEFT metadata (`lora_adapter_metadata`), else its kohya
network alphas, else it is the rank (diffusers' convention).

Only safetensors are read (never a pickle); the path comes from the server's own
configuration, never from a request.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# prefixes under which pipelines store their denoiser's adapter keys
DENOISER_PREFIXES = ("unet.", "transformer.")
TEXT_PREFIXES = ("text_encoder", "te_", "te1_", "te2_", "lora_te")


class LoraError(ValueError):
    """An adapter file that cannot be used (with the reason)."""


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank pair: `down` (r, in[, kh, kw]) and `up` (out, r[, 1, 1])
    with alpha / r folded in."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def conv(self) -> bool:
        return self.down.dim() == 4


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A loaded adapter: its modules by path inside the denoiser."""

    name: str
    digest: str
    modules: dict[str, LoraModule]

    @property
    def nbytes(self) -> int:
        return sum(m.down.nbytes + m.up.nbytes for m in self.modules.values())

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


def _converted(state: dict[str, torch.Tensor], pipeline: Any
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """diffusers' own conversion (kohya and older diffusers names) for a pipeline class
    that has one; its input is the tensors already read, so it reads no file."""
    # probed: PixArt's pipeline has no LoRA loader (its files hold PEFT names already)
    if pipeline is None or not hasattr(pipeline, "lora_state_dict"):
        return state, {}
    out = pipeline.lora_state_dict(state)
    converted, alphas = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    return converted, dict(alphas or {})


def _strip(key: str) -> str:
    for prefix in DENOISER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module-relative PEFT names (`path.lora_A.weight` / `path.lora_B.weight`)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft({_strip(k): v for k, v in state.items()})


def _pattern_value(patterns: dict[str, Any], path: str) -> Any:
    """PEFT's rule for rank/alpha patterns: the pattern matches the end of the path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _alpha_of(path: str, rank: int, meta: dict[str, Any] | None,
              alphas: dict[str, float]) -> float:
    if meta:
        rank_pattern = _pattern_value(meta.get("rank_pattern") or {}, path)
        if rank_pattern is not None and int(rank_pattern) != rank:
            raise LoraError(f"{path}: rank {rank}, its metadata says {rank_pattern}")
        value = _pattern_value(meta.get("alpha_pattern") or {}, path)
        return float(value if value is not None else meta.get("lora_alpha", rank))
    for key, value in alphas.items():
        k = _strip(key)
        for suffix in (".alpha", ".lora_A.weight", ".lora.down.weight", ".down.weight"):
            k = k.removesuffix(suffix)
        if k == path:
            return float(value)
    return float(rank)


def _metadata(raw: dict[str, str]) -> dict[str, Any] | None:
    text = raw.get("lora_adapter_metadata")
    if not text:
        return None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise LoraError("its lora_adapter_metadata is not JSON") from exc
    if not isinstance(meta, dict):
        return None
    # diffusers flattens each component's LoraConfig under "unet." / "transformer."
    for prefix in ("unet.", "transformer."):
        inner = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        if inner:
            return inner
    return meta


def read_adapter(path: Path, name: str, pipeline: Any = None,
                 digest: str | None = None) -> LoraWeights:
    """Read and convert one adapter file (`pipeline`: the diffusers pipeline class whose
    converter applies, or None for the built-in model's PEFT names)."""
    try:
        state = load_file(str(path))
        raw_meta = read_metadata(path)
    except Exception as exc:  # OSError, or safetensors' own SafetensorError (no base)
        raise LoraError(f"not a readable safetensors file ({type(exc).__name__})") from exc
    if any(k.endswith("dora_scale") or "lora_magnitude_vector" in k for k in state):
        raise LoraError("DoRA adapters are not supported")
    text = sorted(k for k in state if k.startswith(TEXT_PREFIXES))
    if text:
        raise LoraError(f"it adapts the text encoder ({text[0]}): only denoiser "
                        "(U-Net / transformer) adapters are supported")
    try:
        converted, alphas = _converted(state, pipeline)
    except Exception as exc:  # the library's converters raise many kinds
        raise LoraError(f"diffusers could not convert it: {exc}") from exc
    if any(k.startswith(TEXT_PREFIXES) for k in converted):
        raise LoraError("it adapts the text encoder: only denoiser (U-Net / transformer) "
                        "adapters are supported")
    peft = _peft_names(converted)
    meta = _metadata(raw_meta)
    modules: dict[str, LoraModule] = {}
    for key, down in peft.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise LoraError(f"unexpected key {key!r} (a LoRA holds lora_A / lora_B "
                                "weights, no biases)")
            continue
        path_ = key.removesuffix(".lora_A.weight")
        up = peft.get(f"{path_}.lora_B.weight")
        if up is None:
            raise LoraError(f"{path_} has lora_A but no lora_B")
        rank = int(down.shape[0])
        if up.shape[1] != rank or down.dim() not in (2, 4) or up.dim() != down.dim():
            raise LoraError(f"{path_}: lora_A {tuple(down.shape)} and lora_B "
                            f"{tuple(up.shape)} do not make a rank-{rank} pair")
        alpha = _alpha_of(path_, rank, meta, alphas)
        rslora = bool(meta and meta.get("use_rslora"))  # PEFT: alpha / sqrt(r)
        scale = alpha / (rank ** 0.5 if rslora else rank)
        modules[path_] = LoraModule(down.float().contiguous(),
                                    (up.float() * scale).contiguous())
    if not modules:
        raise LoraError("it holds no LoRA weights (lora_A / lora_B pairs)")
    return LoraWeights(name, digest or file_digest(path), modules)


def check_fits(adapter: LoraWeights, model: torch.nn.Module) -> str | None:
    """Why the adapter does not fit the model (a module missing or of another shape;
    None when it fits)."""
    found = dict(model.named_modules())
    for path, m in adapter.modules.items():
        target = found.get(path)
        if isinstance(target, torch.nn.Linear) and not m.conv:
            if (m.down.shape[1], m.up.shape[0]) != (target.in_features,
                                                    target.out_features):
                return (f"{path} is {target.in_features}->{target.out_features}, the "
                        f"adapter's {m.down.shape[1]}->{m.up.shape[0]}")
        elif isinstance(target, torch.nn.Conv2d) and m.conv and target.groups == 1:
            if (m.down.shape[1], m.up.shape[0], tuple(m.down.shape[2:])) != (
                    target.in_channels, target.out_channels, tuple(target.kernel_size)):
                return f"{path}: the adapter's conv shapes do not match the model's"
        elif target is None:
            return f"the model has no module {path}"
        else:
            return f"{path} is a {type(target).__name__}: adapters apply to Linear and Conv2d"
    return None
