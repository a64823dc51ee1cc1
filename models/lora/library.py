"""The adapters a server may apply: files found in its configured folders (never a
path from a request), loaded per base model on first use and kept under a byte
budget, least recently used first out.

A folder holds `<name>.safetensors`, or `<name>/pytorch_lora_weights.safetensors`
(what diffusers' `save_lora_weights` writes). `reload()` rescans them; an adapter
whose file changed gets a new digest, so results cached under the old one are not
served for it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .apply import Adapters, attach
from .format import LoraError, LoraWeights, check_fits, file_digest, read_adapter

log = logging.getLogger("stepserve.lora")

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
MAX_FILE_BYTES = 2 << 30  # larger files are not LoRAs of the models served here


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    digest: str
    size: int  # bytes on disk


@dataclass(frozen=True)
class LoraTarget:
    """A served model's denoiser as adapters see it: its name, module and the diffusers
    pipeline class whose key converter applies (None: the built-in model)."""

    model: str
    module: nn.Module
    pipeline: Any = None


@dataclass(frozen=True)
class LoraInfo:
    """One adapter as listed for one model."""

    name: str
    digest: str
    rank: int
    nbytes: int
    error: str | None  # why it does not fit this model (None: it does)


class LoraNotFound(KeyError):
    pass


def scan(dirs: Sequence[Path]) -> dict[str, LoraFile]:
    """The adapters in the folders; a name found twice keeps the first folder's."""
    found: dict[str, LoraFile] = {}
    for folder in dirs:
        if not folder.is_dir():
            log.warning("lora_dirs: %s is not a folder", folder)
            continue
        candidates = [(p.stem, p) for p in folder.glob("*.safetensors")]
        candidates += [(p.parent.name, p) for p in folder.glob(f"*/{DIFFUSERS_FILE}")]
        for name, path in sorted(candidates):
            size = path.stat().st_size
            if name in found or size > MAX_FILE_BYTES:
                continue
            found[name] = LoraFile(name, path, file_digest(path), size)
    return found


class LoraLibrary:
    """Thread-safe: requests resolve adapters while an admin call reloads."""

    def __init__(self, dirs: Sequence[Path | str], budget_bytes: int = 256 << 20) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._files: dict[str, LoraFile] = {}
        self._loaded: OrderedDict[tuple[str, str, str], LoraWeights] = OrderedDict()
        self._infos: dict[tuple[str, str, str], LoraInfo] = {}
        self.reload()

    def reload(self) -> dict[str, LoraFile]:
        files = scan(self.dirs)
        with self._lock:
            self._files = files
            live = {(f.name, f.digest) for f in files.values()}
            for key in [k for k in self._loaded if (k[1], k[2]) not in live]:
                del self._loaded[key]
        log.info("lora: %d adapter(s) in %s", len(files), ", ".join(map(str, self.dirs)))
        return files

    @property
    def files(self) -> dict[str, LoraFile]:
        with self._lock:
            return dict(self._files)

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for w in self._loaded.values())

    def file(self, name: str) -> LoraFile:
        with self._lock:
            found = self._files.get(name)
        if found is None:
            raise LoraNotFound(name)
        return found

    def load(self, name: str, target: LoraTarget) -> LoraWeights:
        """The adapter for this model, hooked into its denoiser (LoraNotFound; LoraError
        when it cannot be read or does not fit)."""
        f = self.file(name)
        key = (target.model, f.name, f.digest)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        weights = read_adapter(f.path, f.name, target.pipeline, f.digest)
        problem = check_fits(weights, target.module)
        if problem:
            raise LoraError(f"adapter {name!r} does not fit model {target.model!r}: {problem}")
        attach(target.module, weights)
        with self._lock:
            self._loaded[key] = weights
            total = sum(w.nbytes for w in self._loaded.values())
            while total > self.budget_bytes and len(self._loaded) > 1:
                _, old = self._loaded.popitem(last=False)
                total -= old.nbytes
        return weights

    def resolve(self, specs: Sequence[tuple[str, float]], target: LoraTarget) -> Adapters:
        return tuple((self.load(name, target), float(scale)) for name, scale in specs)

    def info(self, name: str, target: LoraTarget) -> LoraInfo:
        """The adapter as listed for this model (read once per file version)."""
        f = self.file(name)
        key = (target.model, f.name, f.digest)
        with self._lock:
            if key in self._infos:
                return self._infos[key]
        try:
            w = self.load(name, target)
            info = LoraInfo(name, f.digest, w.rank, w.nbytes, None)
        except LoraError as exc:
            info = LoraInfo(name, f.digest, 0, 0, str(exc))
        with self._lock:
            self._infos[key] = info
        return info
