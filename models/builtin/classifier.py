"""The yardstick's attribute classifier: a small CNN trained on rendered images.

Its penultimate features also serve the Frechet distance.  It is trained with
mild pixel noise so that slightly imperfect generated images are read the way
a person would read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import WEIGHTS_DIR, load_config, load_state, save_module
from .shapes import ATTRIBUTES, VALUES, render, sample_scene, to_tensor

CLASSIFIER_PATH = WEIGHTS_DIR / "classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 32
    width: int = 16
    features: int = 128


def coverage(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel shape coverage in [0, 1], (B, 1, H, W).

    Images are one flat shape on a flat background, so (pixel - bg) projected on
    (fg - bg) is the shape's coverage whatever the colour pair.  Reading shape,
    size and position from it spares the CNN learning that colour-pair
    normalisation (without it small circles and squares were confused ~5%).
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)
    bg = border.median(dim=-1).values[:, :, None, None]
    diff = x - bg
    dist = diff.norm(dim=1, keepdim=True)
    far = (dist >= 0.5 * dist.amax(dim=(2, 3), keepdim=True)).float()
    fg = (x * far).sum(dim=(2, 3), keepdim=True) / far.sum(dim=(2, 3), keepdim=True)
    axis = fg - bg
    cov = (diff * axis).sum(1, keepdim=True) / axis.pow(2).sum(1, keepdim=True).clamp_min(1e-3)
    return cov.clamp(0, 1)


class AttributeClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = []
        chans = [4, w, 2 * w, 4 * w]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GELU(), nn.AvgPool2d(2)]
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        side = cfg.image_size // 8
        self.features = nn.Sequential(nn.Linear(4 * w * side * side, cfg.features), nn.GELU())
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.features, len(VALUES[a]))
                                    for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x in [-1, 1], (B, 3, H, W) -> (logits per attribute, features)."""
        f = self.features(self.trunk(torch.cat([x, coverage(x)], dim=1)))
        return {a: head(f) for a, head in self.heads.items()}, f


def render_batch(rng: np.random.Generator, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [sample_scene(rng) for _ in range(n)]
    labels = torch.tensor([[s.labels()[a] for a in ATTRIBUTES] for s in scenes])
    return to_tensor(render(scenes, size)), labels


def train_classifier(steps: int = 3000, batch: int = 256, seed: int = 0,
                     image_size: int = 32, log_every: int = 0) -> AttributeClassifier:
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny late-training gradients otherwise slow the CPU ~3x
    rng = np.random.default_rng(seed)
    model = AttributeClassifier(ClassifierConfig(image_size=image_size))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in tqdm(range(steps), desc="classifier", mininterval=5):
        x, y = render_batch(rng, batch, image_size)
        x = x + torch.randn_like(x) * torch.rand(batch, 1, 1, 1) * 0.08
        logits, _ = model(x)
        loss = sum(nn.functional.cross_entropy(logits[a], y[:, i])
                   for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            tqdm.write(f"step {step + 1}: {accuracy_on_renders(model.eval(), n=1000)}")
            model.train()
    return model.eval()


@torch.inference_mode()
def accuracy_on_renders(model: AttributeClassifier, n: int = 4000, seed: int = 12345
                        ) -> dict[str, float]:
    x, y = render_batch(np.random.default_rng(seed), n, model.cfg.image_size)
    logits, _ = model(x)
    return {a: float((logits[a].argmax(-1) == y[:, i]).float().mean())
            for i, a in enumerate(ATTRIBUTES)}


def save_classifier(model: AttributeClassifier, path: Path = CLASSIFIER_PATH,
                    meta: dict | None = None) -> None:
    save_module(model, path, asdict(model.cfg), meta)


def load_classifier(path: Path = CLASSIFIER_PATH) -> AttributeClassifier:
    cfg = ClassifierConfig(**load_config(path)["config"])
    return load_state(AttributeClassifier(cfg), path).eval()
