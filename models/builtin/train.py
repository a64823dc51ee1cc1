"""Training recipe for the built-in DiT: flow matching + shortcut self-consistency.

- Flow matching (d = 0) with time drawn uniformly then shifted toward noise
  (t' = s t / (1 + (s-1) t)), the same shift the sampler uses: text only
  matters at high noise for flat images, so that range must be seen often.
- Shortcut models (Frans et al.): a quarter of each batch learns
  v(x, t, 2d) = (v(x, t, d) + v(x', t - d, d)) / 2, x' = x - d v(x, t, d),
  so one checkpoint samples well at 1, 2, 4 and 8 steps.
- Caption dropout for classifier-free guidance; EMA weights are shipped.
- Every step's data and noise derive from (seed, step), so a resumed run is
  the same run.
- v3 (a second stage started from v2's weights, `init_from`): a full-resolution refine
  stage (refine.py), a loss weighted toward the shape and its edges, more small
  shapes, grammar v3 and noise on the prompt embedding.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..sampling.schedules import shift_time
from .checkpoint import save_module
from .dit import DiT, DiTConfig
from .pool import CaptionPool, build_pool, pool_file
from .shapes import Scene, render_with_coverage, sample_scene, to_tensor
from .text import TextBatch, TextEncoder


@dataclass
class TrainConfig:
    steps: int = 5000
    batch: int = 128
    lr: float = 6e-4
    warmup: int = 250
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1
    omit_prob: float = 0.1
    captions: str = "v2"  # training-caption grammar (captions.GRAMMARS); v2 ships
    shortcut_fraction: float = 0.25
    shortcut_levels: int = 7  # base step sizes d = 2^-1 .. 2^-levels
    pool_size: int = 48000
    seed: int = 0
    bf16: bool = True
    eval_every: int = 500
    eval_prompts: int = 64
    eval_guidance: float = 3.0  # the shipped run's quick evals; the model serves at 1.0
    default_guidance: float = 1.0  # written to dit.json: what the server uses by default
    # written to dit.json: the initial noise's scale the server samples with, chosen by
    # measuring the trained model (v3: docs/builtin-eval.md); training itself uses 1
    noise_scale: float = 1.0
    checkpoint_every: int = 250
    init_from: str = ""  # a dit.safetensors to start from (new layers start as identity)
    small_share: float = 0.5  # share of small shapes among drawn captions
    shape_weight: float = 0.0  # extra loss weight on pixels inside the shape
    edge_weight: float = 0.0  # extra loss weight on the shape's edge pixels (+1 px)
    text_noise: float = 0.0  # Gaussian noise on the prompt embedding, in its std units
    model: DiTConfig = field(default_factory=DiTConfig)


@dataclass
class Batch:
    x0: torch.Tensor
    text: TextBatch
    gen: torch.Generator
    coverage: torch.Tensor  # (B, H, W) shape coverage of each pixel


def recipe(name: str, seed: int = 0, init_from: str = "") -> TrainConfig:
    """A shipped checkpoint's training config: v2 from scratch; v3 the second stage,
    started from v2's weights (`init_from`)."""
    if name == "v2":
        return TrainConfig(seed=seed)
    if name == "v3":
        return TrainConfig(seed=seed, steps=3500, lr=3e-4, warmup=100, captions="v3",
                           init_from=init_from, small_share=0.65, shape_weight=1.0,
                           edge_weight=3.0, text_noise=0.1, eval_every=500,
                           eval_guidance=1.0, noise_scale=0.8, model=DiTConfig(refine=64))
    raise ValueError(f"unknown recipe {name!r}: v2 or v3")


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_batch(cfg: TrainConfig, pool: CaptionPool, step: int,
               scene_map: Callable[[Scene], Scene] | None = None) -> Batch:
    """Captions from the pool and renders of their scenes (`scene_map`: the scene a
    LoRA style draws instead, lora_train.py)."""
    rng = np.random.default_rng([cfg.seed, step])
    if cfg.small_share == 0.5:  # uniform draws: the v2 recipe's batches, bit for bit
        index = rng.integers(len(pool), size=cfg.batch)
    else:
        index = rng.choice(len(pool), size=cfg.batch, p=pool.size_weights(cfg.small_share))
    scenes = [sample_scene(rng, **pool.scene_kwargs(int(i))) for i in index]
    if scene_map is not None:
        scenes = [scene_map(s) for s in scenes]
    images, coverage = render_with_coverage(scenes, cfg.model.image_size)
    x0 = to_tensor(images)
    text = pool.text(index)
    if cfg.text_noise:
        text = noisy_text(text, cfg.text_noise, torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + step + 500_000_000), pool.pooled_spread)
    drop = torch.from_numpy(rng.random(cfg.batch) < cfg.caption_dropout)
    if drop.any():
        empty = TextBatch.cat([text, pool.empty])  # pads to a common length
        n = empty.tokens.shape[1]
        text = TextBatch(empty.tokens[:cfg.batch].clone(), empty.mask[:cfg.batch].clone(),
                         text.pooled.clone())
        e = pool.empty
        text.tokens[drop] = torch.nn.functional.pad(e.tokens, (0, 0, 0, n - e.tokens.shape[1]))
        text.mask[drop] = torch.nn.functional.pad(e.mask, (0, n - e.mask.shape[1]))
        text.pooled[drop] = e.pooled
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return Batch(x0, text, gen, torch.from_numpy(coverage))


def noisy_text(text: TextBatch, sigma: float, gen: torch.Generator,
               pooled_spread: torch.Tensor) -> TextBatch:
    """Prompt embeddings with Gaussian noise, so that nearby phrasings the grammar never
    wrote land on the same image: each token state's noise is sigma times its own
    spread; the pooled vector's is sigma times each dimension's spread over the pool
    (`pooled_spread`), the units the model z-scores it in (its own spread is ~10x
    larger and would drown the conditioning)."""
    tok_scale = sigma * text.tokens.std(dim=-1, keepdim=True)
    tokens = text.tokens + tok_scale * torch.randn(text.tokens.shape, generator=gen)
    pooled = text.pooled + sigma * pooled_spread * torch.randn(text.pooled.shape, generator=gen)
    return TextBatch(tokens, text.mask, pooled)


def pixel_weights(cfg: TrainConfig, coverage: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, H, W) loss weights, mean 1: more on the shape and on its edges (where
    patch-wise predictions go ragged), or None for a plain loss."""
    if not (cfg.shape_weight or cfg.edge_weight):
        return None
    cov = coverage[:, None]
    edge = ((cov > 0.02) & (cov < 0.98)).float()
    edge = torch.nn.functional.max_pool2d(edge, 3, stride=1, padding=1)
    w = 1 + cfg.shape_weight * (cov > 0.5).float() + cfg.edge_weight * edge
    return w / w.mean(dim=(2, 3), keepdim=True)


def training_targets(model: torch.nn.Module, cfg: TrainConfig, x0: torch.Tensor, text: TextBatch,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor]:
    """(x_t, t, d, target velocity) for a batch: flow-matching rows then shortcut rows."""
    b = x0.shape[0]
    n_sc = int(b * cfg.shortcut_fraction)
    noise = torch.randn(x0.shape, generator=gen)
    u = torch.rand(b, generator=gen)
    t = shift_time(u, cfg.model.time_shift)
    d = torch.zeros(b)
    level = torch.randint(1, cfg.shortcut_levels + 1, (n_sc,), generator=gen)
    d_base = 2.0 ** -level.float()
    sc = slice(b - n_sc, b)
    t[sc] = 2 * d_base + (1 - 2 * d_base) * t[sc]
    d[sc] = 2 * d_base
    col = t.view(-1, 1, 1, 1)
    x_t = (1 - col) * x0 + col * noise
    target = noise - x0
    if n_sc:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
            sub = text.select(list(range(b - n_sc, b)))
            query_d = torch.where(level == cfg.shortcut_levels, torch.zeros_like(d_base), d_base)
            ts, xs = t[sc], x_t[sc]
            v1 = model(xs, ts, query_d, sub).float()
            x_mid = xs - d_base.view(-1, 1, 1, 1) * v1
            v2 = model(x_mid, ts - d_base, query_d, sub).float()
        target[sc] = (v1 + v2) / 2
    return x_t, t, d, target


class RunState:
    """Model, EMA, optimizer and step, saved as safetensors (nothing pickled)."""

    def __init__(self, cfg: TrainConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model = DiT(cfg.model)
        self.ema = DiT(cfg.model).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay)
        self.step = 0

    def save(self, path: Path) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        names = {p: n for n, p in self.model.named_parameters()}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                tensors[f"opt.{names[p]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["step"] = torch.tensor(self.step)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)

    def load(self, path: Path) -> None:
        t = load_file(str(path))
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        for name, p in self.model.named_parameters():
            if f"opt.{name}.step" in t:
                self.opt.state[p] = {k: t[f"opt.{name}.{k}"]
                                     for k in ("step", "exp_avg", "exp_avg_sq")}
        self.step = int(t["step"])

    def start_from(self, path: Path) -> None:
        """Weights of an earlier checkpoint; layers it lacks keep their init (the refine
        stage starts as identity)."""
        weights = load_file(str(path))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("refiner.") for k in missing):
            raise ValueError(f"{path} does not fit this model: missing {missing}, "
                             f"unexpected {unexpected}")
        self.ema.load_state_dict(self.model.state_dict())


def fit_pooled_stats(model: DiT, pool: CaptionPool) -> None:
    model.pooled_mean.copy_(pool.pooled.mean(0))
    model.pooled_std.copy_(pool.pooled_spread)


def train(cfg: TrainConfig, run_dir: Path, out: Path | None = None,
          encoder: TextEncoder | None = None, evaluator=None) -> DiT:
    """Train (or resume) in run_dir; write EMA weights to `out` at the end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    encoder = encoder or TextEncoder()
    pool = build_pool(encoder, cfg.pool_size, cfg.seed, cfg.omit_prob,
                      cache=pool_file(run_dir, cfg.captions), grammar=cfg.captions)
    state = RunState(cfg)
    ckpt = run_dir / "state.safetensors"
    if ckpt.exists():
        state.load(ckpt)
    elif cfg.init_from:
        state.start_from(Path(cfg.init_from))  # keeps its pooled z-scoring
    else:
        fit_pooled_stats(state.model, pool)
        fit_pooled_stats(state.ema, pool)
    log_path = run_dir / "log.jsonl"
    kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else [])
            if json.loads(line)["step"] <= state.step]  # drop steps lost since the checkpoint
    log_path.write_text("".join(line + "\n" for line in kept))
    log = log_path.open("a")
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train-builtin", mininterval=10)
    started = time.perf_counter()
    while state.step < cfg.steps:
        step = state.step
        for g in state.opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        batch = make_batch(cfg, pool, step)
        x_t, t, d, target = training_targets(state.model, cfg, batch.x0, batch.text, batch.gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
            pred = state.model(x_t, t, d, batch.text)
        err = (pred.float() - target).pow(2)
        weights = pixel_weights(cfg, batch.coverage)
        loss = (err if weights is None else err * weights).mean()
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        state.opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(state.ema.parameters(), state.model.parameters()):
                pe.lerp_(pm, 1 - decay)
        state.step += 1
        bar.update(1)
        record = {"step": state.step, "loss": round(float(loss.detach()), 5),
                  "seconds": round(time.perf_counter() - started, 1)}
        if evaluator is not None and (state.step % cfg.eval_every == 0
                                      or state.step == cfg.steps):
            record["eval"] = evaluator(state.ema)
            bar.write(json.dumps(record))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            state.save(ckpt)
    bar.close()
    if out is not None:
        save_module(state.ema, out, cfg.model.to_dict(),
                    {"train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
                     "default_guidance": cfg.default_guidance,
                     "noise_scale": cfg.noise_scale})
    return state.ema
