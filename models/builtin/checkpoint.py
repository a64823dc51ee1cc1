"""safetensors + JSON config on disk; nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def save_module(module: nn.Module, path: Path, config: dict,
                meta: dict | None = None) -> None:
    """Write `path` (.safetensors) and `path` with .json holding config and metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps({"config": config, **(meta or {})},
                                                    indent=2) + "\n")


def load_config(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def load_state(module: nn.Module, path: Path) -> nn.Module:
    state = load_file(str(path))
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) for k, v in state.items()}
    module.load_state_dict(state)
    return module


def module_hash(module: nn.Module) -> str:
    """Digest of a module's parameters and buffers: the same weights give the same key,
    whether they came from a file or from memory."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
