"""On-disk cache of engine builds (ONNX exports, quantized graphs, TensorRT plans).

An entry is a folder named by a digest of everything the build depends on (model
weights hash, exporter and version, opset, shapes, precision, GPU, ...), with a
manifest.json that records that key. Entries are written to a temporary folder
and renamed into place, so a crashed build never leaves a half entry and two
processes building the same thing at once both end up with a whole one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stepserve.models.builtin.checkpoint import module_hash

__all__ = ["BuildCache", "module_hash"]

MANIFEST = "manifest.json"


def default_root() -> Path:
    env = os.environ.get("STEPSERVE_BUILD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stepserve" / "builds"


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class BuildCache:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else default_root()

    def path(self, kind: str, key: dict) -> Path:
        return self.root / f"{kind}-{digest({'kind': kind, **key})}"

    def lookup(self, kind: str, key: dict) -> Path | None:
        """The entry's folder if a complete build exists."""
        path = self.path(kind, key)
        return path if (path / MANIFEST).is_file() else None

    @contextlib.contextmanager
    def building(self, kind: str, key: dict) -> Iterator[Path]:
        """Yield a scratch folder; on success it becomes the entry (with its manifest)."""
        final = self.path(kind, key)
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            yield scratch
            (scratch / MANIFEST).write_text(json.dumps({"kind": kind, **key}, indent=2))
            try:
                scratch.rename(final)
            except OSError:  # another process finished the same build first
                if not (final / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def entries(self) -> list[dict]:
        out = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            out.append({"path": str(manifest.parent), **json.loads(manifest.read_text())})
        return out
