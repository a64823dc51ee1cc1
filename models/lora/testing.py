"""Random adapters in the formats people ship, for tests and benchmarks: diffusers
folders get theirs from PEFT and the pipeline's own `save_lora_weights`; the built-in
model gets PEFT-named safetensors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def random_adapter(folder: Path, out: Path, targets: Sequence[str], rank: int,
                   seed: int = 0, alpha: float | None = None, std: float = 0.3) -> Path:
    """A random LoRA for a diffusers folder's denoiser, written by the pipeline's own
    `save_lora_weights` (with PEFT metadata when `alpha` is given; without it
    diffusers takes alpha = rank)."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    # probed: U-Net pipelines have a unet, DiT pipelines a transformer
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    model = getattr(pipe, name)  # the component named just above
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                     init_lora_weights=False)
    model.add_adapter(cfg, adapter_name="random")
    with torch.no_grad():  # PEFT's own random init barely moves a tiny model's image
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, std)
    layers = get_peft_model_state_dict(model, adapter_name="random")
    extra = {f"{name}_lora_adapter_metadata": cfg.to_dict()} if alpha else {}
    type(pipe).save_lora_weights(str(out), **{f"{name}_lora_layers": layers}, **extra)
    return out / "pytorch_lora_weights.safetensors"


def random_builtin_adapter(model: nn.Module, out: Path, rank: int, seed: int = 0,
                           targets: Sequence[str] = ("q", "kv", "out", "mlp.0", "mlp.2"),
                           std: float = 0.02) -> Path:
    """A random LoRA for the built-in DiT's Linear layers whose path ends in a target."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(path.endswith(f".{t}") for t in targets):
            tensors[f"{path}.lora_A.weight"] = torch.randn(rank, m.in_features,
                                                           generator=gen) / m.in_features**.5
            tensors[f"{path}.lora_B.weight"] = std * torch.randn(m.out_features, rank,
                                                                 generator=gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": rank})}
    save_file(tensors, str(out), metadata=meta)
    return out
