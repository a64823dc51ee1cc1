"""A fixed, seeded pool of training captions, encoded once by MiniLM.

Encoding captions costs about as much as a training step, so training draws
from this pool; each draw is rendered afresh (new jitter), so images never repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .captions import GRAMMARS, train_caption
from .shapes import ATTRIBUTES, VALUES, sample_scene
from .text import TextBatch, TextEncoder


@dataclass
class CaptionPool:
    labels: torch.Tensor  # (N, 5) attribute indices (ATTRIBUTES order)
    tokens: torch.Tensor  # (N, L, 384) bf16, zero-padded
    lengths: torch.Tensor  # (N,)
    pooled: torch.Tensor  # (N, 384)
    empty: TextBatch  # the unconditional (empty) caption

    def __len__(self) -> int:
        return self.labels.shape[0]

    def text(self, index: np.ndarray) -> TextBatch:
        idx = torch.from_numpy(index)
        length = int(self.lengths[idx].max())
        mask = torch.arange(length)[None] < self.lengths[idx][:, None]
        return TextBatch(self.tokens[idx, :length].float(), mask, self.pooled[idx])

    @cached_property
    def pooled_spread(self) -> torch.Tensor:
        """Each pooled dimension's standard deviation over the pool (the model z-scores
        the pooled vector by the same)."""
        return self.pooled.std(dim=0).clamp_min(1e-4)

    def size_weights(self, small_share: float) -> np.ndarray:
        """Draw probabilities that give small shapes `small_share` of the draws."""
        small = (self.labels[:, ATTRIBUTES.index("size")] == VALUES["size"].index("small")
                 ).numpy()
        w = np.where(small, small_share / max(1, small.sum()),
                     (1 - small_share) / max(1, (~small).sum()))
        return w / w.sum()

    def scene_kwargs(self, i: int) -> dict[str, str]:
        return {a: VALUES[a][int(v)] for a, v in zip(ATTRIBUTES, self.labels[i])}


def pool_file(folder: Path, grammar: str) -> Path:
    """Where a run keeps its encoded caption pool: one per grammar, so a stage with
    another grammar never reads the previous stage's pool."""
    return folder / f"caption_pool_{grammar}.safetensors"


def build_pool(encoder: TextEncoder, size: int, seed: int, omit_prob: float,
               cache: Path | None = None, grammar: str = "v2") -> CaptionPool:
    if cache is not None and cache.exists():
        t = load_file(str(cache))
        empty = TextBatch(t["empty_tokens"], torch.ones(1, t["empty_tokens"].shape[1],
                                                        dtype=torch.bool), t["empty_pooled"])
        return CaptionPool(t["labels"], t["tokens"], t["lengths"], t["pooled"], empty)
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng) for _ in range(size)]
    captions = [train_caption(s, rng, omit_prob, GRAMMARS[grammar]) for s in scenes]
    labels = torch.tensor([[s.labels()[a] for a in ATTRIBUTES] for s in scenes])
    chunks = []
    for i in tqdm(range(0, size, 512), desc="encoding captions", mininterval=5):
        chunks.append(encoder.encode(captions[i:i + 512]))
    length = max(c.tokens.shape[1] for c in chunks)
    tokens = torch.cat([torch.nn.functional.pad(c.tokens, (0, 0, 0, length - c.tokens.shape[1]))
                        for c in chunks]).to(torch.bfloat16)
    lengths = torch.cat([c.mask.sum(1) for c in chunks])
    pooled = torch.cat([c.pooled for c in chunks])
    empty = encoder.encode([""])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"labels": labels, "tokens": tokens, "lengths": lengths, "pooled": pooled,
                   "empty_tokens": empty.tokens, "empty_pooled": empty.pooled}, str(cache))
    return CaptionPool(labels, tokens, lengths, pooled, empty)
