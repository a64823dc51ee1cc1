"""LoRA adapters at the API: the `lora` request field checked against what each served
model can apply, `GET /v1/loras`, and reloading the folders (`POST /v1/loras/reload`,
or SIGHUP)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import APIRouter, Request

from stepserve.models.lora.library import LoraInfo, LoraLibrary, LoraNotFound, LoraTarget

from .errors import APIError, shown
from .protocol import LoraSpec
from .scheduler.request import LoraChoice

router = APIRouter()


class LoraCatalog(Protocol):
    """The adapters one served model may apply."""

    def info(self, name: str) -> LoraInfo | None:
        """The adapter as it is for this model (None: no adapter of that name)."""

    def all(self) -> list[LoraInfo]: ...

    def reload(self) -> None: ...

    @property
    def source(self) -> object:
        """What reload() rescans (models sharing one library rescan it once)."""


@dataclass
class LocalLoras:
    """A model loaded in this process: the library's files, each checked against it."""

    library: LoraLibrary
    target: LoraTarget

    def info(self, name: str) -> LoraInfo | None:
        try:
            return self.library.info(name, self.target)
        except LoraNotFound:
            return None

    def all(self) -> list[LoraInfo]:
        found = (self.info(name) for name in sorted(self.library.files))
        return [i for i in found if i is not None]

    def reload(self) -> None:
        self.library.reload()

    @property
    def source(self) -> object:
        return self.library


@dataclass
class AnnouncedLoras:
    """The API role: the adapters a worker announced for the model (server/redis)."""

    infos: dict[str, LoraInfo]
    refresh: Callable[[], list[dict] | None] | None = None  # rereads the announcement

    def info(self, name: str) -> LoraInfo | None:
        return self.infos.get(name)

    def all(self) -> list[LoraInfo]:
        return [self.infos[k] for k in sorted(self.infos)]

    def reload(self) -> None:
        """Workers rescan their own folders (SIGHUP) and announce the result; this
        rereads what they announced."""
        items = self.refresh() if self.refresh is not None else None
        if items is not None:
            self.infos = AnnouncedLoras.from_json(items).infos

    @property
    def source(self) -> object:
        return self

    def to_json(self) -> list[dict]:
        return catalog_json(self)

    @staticmethod
    def from_json(items: list[dict]) -> AnnouncedLoras:
        return AnnouncedLoras({d["name"]: LoraInfo(**d) for d in items})


def catalog_json(catalog: LoraCatalog) -> list[dict]:
    """The adapters as a worker announces them in Redis."""
    return [dataclasses.asdict(i) for i in catalog.all()]


def choose(specs: Sequence[LoraSpec] | None, catalog: LoraCatalog | None, model: str,
           limit: int) -> tuple[LoraChoice, ...]:
    """The request's adapters, each checked for this model (404 unknown, 400 otherwise);
    the file's digest keys cached results to its version."""
    if not specs:
        return ()
    if len(specs) > limit:
        raise APIError(400, f"lora: at most {limit} adapters per request on this server "
                       "(max_loras_per_request)", "lora", "invalid_value")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise APIError(400, "lora: an adapter is named twice (give one entry with the sum "
                       "of the scales)", "lora", "invalid_value")
    if catalog is None:
        raise APIError(400, f"lora: model {model!r} does not take LoRA adapters on this "
                       "engine", "lora", "unsupported_value")
    chosen = []
    for i, spec in enumerate(specs):
        info = catalog.info(spec.name)
        if info is None:
            raise APIError(404, f"lora[{i}].name: no adapter named {shown(spec.name)!r} "
                           "(see GET /v1/loras)", f"lora[{i}].name", "lora_not_found")
        if info.error:
            raise APIError(400, f"lora[{i}].name: {shown(info.error, 300)}",
                           f"lora[{i}].name", "unsupported_value")
        chosen.append(LoraChoice(spec.name, spec.scale, info.digest))
    return tuple(chosen)


def listing(rt) -> dict:  # rt: server.runtime.Runtime (no import: it imports this module)
    """Every adapter with the served models it fits (and why not, for the others)."""
    rows: dict[str, dict] = {}
    for served in rt.models.values():
        if served.loras is None:
            continue
        for info in served.loras.all():
            row = rows.setdefault(info.name, {"id": info.name, "object": "lora",
                                              "digest": info.digest, "models": [],
                                              "rank": info.rank, "bytes": info.nbytes,
                                              "not_for": {}})
            if info.error:
                row["not_for"][served.name] = info.error
            else:
                row["models"].append(served.name)
                row["rank"], row["bytes"] = info.rank, info.nbytes
    return {"object": "list", "data": [rows[k] for k in sorted(rows)]}


def reload_all(rt) -> None:
    seen = set()
    for served in rt.models.values():
        if served.loras is not None and id(served.loras.source) not in seen:
            seen.add(id(served.loras.source))
            served.loras.reload()


@router.get("/v1/loras", tags=["lora"])
async def list_loras(request: Request) -> dict:
    """The adapters requests may name, with the models each fits."""
    return listing(request.app.state.runtime)


@router.post("/v1/loras/reload", tags=["lora"])
async def reload_loras(request: Request) -> dict:
    """Rescan the lora_dirs folders (as SIGHUP does); changed files get new digests."""
    rt = request.app.state.runtime
    await asyncio.to_thread(reload_all, rt)
    return listing(rt)
