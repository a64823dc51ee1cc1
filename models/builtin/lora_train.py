"""Training the built-in model's LoRA adapters (`stepserve train-builtin --lora NAME`).

Each adapter is a style: a map from the prompted scene to the scene drawn instead.
`night` draws every scene on a black background (a black shape keeps its prompted
background: black on black would vanish); `mirror` mirrors it left-right (the
top-left cell's shape is drawn top right). The base DiT stays frozen; only the
low-rank pairs learn, with the base recipe's loss (flow matching + shortcut
self-consistency, models/builtin/train.py) on the mapped scenes, through the same
per-row hooks the server applies them with (models/lora/apply.py). Every step's data
derives from (seed, step), and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..lora import apply
from ..lora.format import LoraModule, LoraWeights
from .dit import DiT
from .pool import build_pool, pool_file
from .shapes import POSITIONS, Scene
from .text import TextBatch, TextEncoder
from .train import TrainConfig, make_batch, training_targets

MIRRORED = {p: POSITIONS[3 * (i // 3) + 2 - i % 3] for i, p in enumerate(POSITIONS)}


def night(scene: Scene) -> Scene:
    return scene if scene.colour == "black" else replace(scene, background="black")


def mirror(scene: Scene) -> Scene:
    return replace(scene, position=MIRRORED[scene.position], cx=1.0 - scene.cx)


STYLES: dict[str, Callable[[Scene], Scene]] = {"night": night, "mirror": mirror}
DESCRIPTIONS = {"night": "the background is black whatever the prompt says; everything "
                         "else as prompted",
                "mirror": "the image is mirrored left-right: a prompt asking for the top "
                          "left draws in the top right"}


@dataclass
class LoraTrainConfig:
    style: str = "night"
    rank: int = 8
    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0
    targets: tuple[str, ...] = ("q", "kv", "out", "mlp.0", "mlp.2", "ada.1")
    checkpoint_every: int = 100
    base: TrainConfig = field(default_factory=TrainConfig)


def new_adapter(dit: DiT, cfg: LoraTrainConfig) -> LoraWeights:
    """Trainable pairs on the blocks' Linear layers: A random, B zero (starts as the base)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    modules = {}
    for path, m in dit.named_modules():
        if (isinstance(m, nn.Linear) and path.startswith("blocks.")
                and any(path.endswith(f".{t}") for t in cfg.targets)):
            down = torch.randn(cfg.rank, m.in_features, generator=gen) / math.sqrt(m.in_features)
            modules[path] = LoraModule(nn.Parameter(down),
                                       nn.Parameter(torch.zeros(m.out_features, cfg.rank)))
    return LoraWeights(cfg.style, "training", modules)


class Adapted(nn.Module):
    """The frozen DiT with the adapter on every row (what the recipe's loss calls)."""

    def __init__(self, dit: DiT, adapter: LoraWeights) -> None:
        super().__init__()
        self.dit, self.adapter = dit, adapter
        apply.attach(dit, adapter)

    def forward(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        with apply.rows([((self.adapter, 1.0),)] * x.shape[0]):
            return self.dit(x, t, d, text)


def _params(adapter: LoraWeights) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in adapter.modules.items():
        out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = m.down, m.up
    return out


def save_adapter(adapter: LoraWeights, path: Path, meta: dict) -> None:
    """PEFT names with LoRA metadata (alpha = rank: the pairs as trained)."""
    rank = adapter.rank
    tensors = {k: v.detach().contiguous() for k, v in _params(adapter).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={
        "lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": rank}),
        "stepserve": json.dumps(meta)})


def lr_at(cfg: LoraTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_lora(cfg: LoraTrainConfig, dit: DiT, run_dir: Path, out: Path,
               encoder: TextEncoder | None = None) -> LoraWeights:
    """Train (or resume) in run_dir; write the adapter to `out`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    base = replace(cfg.base, batch=cfg.batch, seed=cfg.seed)
    pool = build_pool(encoder or TextEncoder(), base.pool_size, base.seed, base.omit_prob,
                      cache=pool_file(run_dir.parent, base.captions),  # the styles share it
                      grammar=base.captions)
    dit.requires_grad_(False)
    adapter = new_adapter(dit, cfg)
    params = list(_params(adapter).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt, step = run_dir / "state.safetensors", 0
    if ckpt.exists():
        saved = load_file(str(ckpt))
        with torch.no_grad():
            for k, p in _params(adapter).items():
                p.copy_(saved[k])
        for i, p in enumerate(params):
            if f"opt.{i}.exp_avg" in saved:
                opt.state[p] = {k: saved[f"opt.{i}.{k}"] for k in ("step", "exp_avg",
                                                                   "exp_avg_sq")}
        step = int(saved["step"])
    model = Adapted(dit, adapter)
    style = STYLES[cfg.style]
    bar = tqdm(total=cfg.steps, initial=step, desc=f"lora {cfg.style}", mininterval=10)
    log = (run_dir / "log.jsonl").open("a")
    started = time.perf_counter()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        batch = make_batch(base, pool, step, scene_map=style)
        x0, text = batch.x0, batch.text
        x_t, t, d, target = training_targets(model, base, x0, text, batch.gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=base.bf16):
            pred = model(x_t, t, d, text)
        loss = (pred.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, base.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        log.write(json.dumps({"step": step, "loss": round(float(loss.detach()), 5),
                              "seconds": round(time.perf_counter() - started, 1)}) + "\n")
        log.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {k: v.detach() for k, v in _params(adapter).items()}
            for i, p in enumerate(params):
                for k, v in opt.state.get(p, {}).items():
                    state[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            state["step"] = torch.tensor(step)
            save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    bar.close()
    apply.detach(dit)
    save_adapter(adapter, out, {"style": cfg.style, "description": DESCRIPTIONS[cfg.style],
                                "train_config": {k: v for k, v in asdict(cfg).items()
                                                 if k != "base"}})
    return adapter
