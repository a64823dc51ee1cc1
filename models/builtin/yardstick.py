"""The built-in model's quality yardstick: prompt accuracy and Frechet distance.

Prompts come in two sets: "seen" (phrased by the training grammar) and
"unseen" (templates and synonyms the training grammar never produces).
Generated images are read by the attribute classifier; FD compares classifier
features of generated images with renders of the same prompts' scenes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from . import geometry
from .captions import train_caption, unseen_caption
from .classifier import AttributeClassifier, load_classifier
from .shapes import ATTRIBUTES, PALETTE, Scene, render, sample_scene, to_tensor

PROMPT_SEED = 20261128


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    scenes: tuple[Scene, ...]
    seeds: tuple[int, ...]

    @cached_property
    def labels(self) -> np.ndarray:
        return np.array([[s.labels()[a] for a in ATTRIBUTES] for s in self.scenes])


def prompt_set(name: str, n: int, seed: int = PROMPT_SEED) -> PromptSet:
    """The fixed evaluation prompts: `seen` or `unseen` phrasings of random scenes."""
    phrase = {"seen": train_caption, "unseen": unseen_caption}[name]
    offset = {"seen": 0, "unseen": 1}[name]
    rng = np.random.default_rng([seed, offset])
    scenes = tuple(sample_scene(rng) for _ in range(n))
    prompts = tuple(phrase(s, rng) for s in scenes)
    seeds = tuple(int(seed % 100000) * 10 + offset * 100000 + i for i in range(n))
    return PromptSet(name, prompts, scenes, seeds)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr(sqrt(A B)) is the sum of square roots of A B's eigenvalues (real and >= 0 for
    # covariance matrices); this avoids sqrtm's trouble with rank-deficient covariances.
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(eig).sum())


class Yardstick:
    def __init__(self, classifier: AttributeClassifier | None = None) -> None:
        self.classifier = classifier or load_classifier()

    @torch.inference_mode()
    def read(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (predicted labels (N, 5), features (N, F))."""
        preds, feats = [], []
        for i in range(0, len(images), 512):
            logits, f = self.classifier(to_tensor(images[i:i + 512]))
            preds.append(torch.stack([logits[a].argmax(-1) for a in ATTRIBUTES], 1))
            feats.append(f)
        return torch.cat(preds).numpy(), torch.cat(feats).double().numpy()

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Per-attribute and all-five prompt accuracy, in percent."""
        pred, _ = self.read(images)
        hit = pred == labels
        out = {a: 100.0 * float(hit[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
        out["all_five"] = 100.0 * float(hit.all(1).mean())
        return out

    @torch.inference_mode()
    def agreement(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Soft prompt agreement: the classifier's mean probability of each prompted
        attribute (continuous, so small changes in image quality register)."""
        probs = []
        for i in range(0, len(images), 512):
            logits, _ = self.classifier(to_tensor(images[i:i + 512]))
            lab = torch.from_numpy(labels[i:i + 512])
            probs.append(torch.stack([logits[a].softmax(-1).gather(1, lab[:, k:k + 1])[:, 0]
                                      for k, a in enumerate(ATTRIBUTES)], 1))
        return float(torch.cat(probs).mean())

    def reference_features(self, scenes: tuple[Scene, ...], copies: int = 4,
                           seed: int = 1) -> np.ndarray:
        """Features of fresh renders (new jitter) of the given scenes' attributes."""
        rng = np.random.default_rng(seed)
        fresh = [sample_scene(rng, shape=s.shape, colour=s.colour, background=s.background,
                              size=s.size, position=s.position)
                 for s in scenes for _ in range(copies)]
        return self.read(render(fresh, self.classifier.cfg.image_size))[1]

    def fd(self, images: np.ndarray, scenes: tuple[Scene, ...]) -> float:
        return frechet_distance(self.read(images)[1], self.reference_features(scenes))


def palette_error(images: np.ndarray) -> float:
    """Reference-free image quality: mean distance (0..1) of each pixel to the nearest
    colour of the dataset's palette; shapes images are flat palette colours, so noise,
    tints and mushy edges raise it."""
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255.0
    pixels = torch.from_numpy(images.reshape(-1, 3)).float() / 255.0
    return float(torch.cdist(pixels, palette).min(dim=1).values.mean())


@dataclass(frozen=True)
class EvalRow:
    steps: int
    prompt_set: str
    accuracy: dict[str, float]  # the learned classifier's reading
    fd: float
    images_per_s: float
    strict: dict[str, float] | None = None  # the geometric reading (geometry.py)


# generate(prompts, seeds, steps=..., guidance=..., sampler=...) -> uint8 (N, H, W, 3)
Generate = Callable[..., np.ndarray]


def evaluate(generate: Generate, yardstick: Yardstick,
             steps_list: tuple[int, ...] = (1, 2, 4, 8, 16, 32), n: int = 200,
             guidance: float | None = None, sampler: str = "euler",
             sets: tuple[str, ...] = ("seen", "unseen"), with_fd: bool = True) -> list[EvalRow]:
    """Generate each prompt set at each step count and score it."""
    rows = []
    for name in sets:
        ps = prompt_set(name, n)
        for steps in steps_list:
            start = time.perf_counter()
            images = generate(ps.prompts, ps.seeds, steps=steps, guidance=guidance,
                              sampler=sampler)
            seconds = time.perf_counter() - start
            fd = yardstick.fd(images, ps.scenes) if with_fd else float("nan")
            rows.append(EvalRow(steps, name, yardstick.accuracy(images, ps.labels), fd,
                                len(images) / seconds, geometry.accuracy(images, ps.labels)))
    return rows


def format_table(rows: list[EvalRow]) -> str:
    """The strict (geometric) reading first: the headline; then the classifier's."""
    head = ["set", "steps", "strict shape", "strict all-five", "shape", "colour", "bg",
            "size", "pos", "all-five", "FD", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a, st = r.accuracy, r.strict or {}
        cells = [r.prompt_set, str(r.steps),
                 *(f"{st[k]:.1f}" if k in st else "" for k in ("shape", "all_five")),
                 *(f"{a[k]:.1f}" for k in
                   ("shape", "colour", "background", "size", "position", "all_five")),
                 f"{r.fd:.2f}", f"{r.images_per_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
