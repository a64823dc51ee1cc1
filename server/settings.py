"""One typed settings object: defaults < config file < STEPSERVE_* environment < flags.

The config file (TOML or JSON) comes from `--config` or STEPSERVE_CONFIG and
uses the same keys as the flags, with underscores (`max_batch_size = 16`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stepserve.engines.registry import PRECISIONS
from stepserve.engines.registry import available as engine_names
from stepserve.models.caches.config import policy_names

# the built-in model's adapters, shipped beside its weights (models/builtin/weights)
BUILTIN_LORA_DIR = Path(__file__).resolve().parents[1] / "models" / "builtin" / "weights" / "loras"

# Fields whose values a registry lists: the CLI offers these choices, validation uses them.
CHOICES: dict[str, Callable[[], tuple[str, ...] | list[str]]] = {
    "engine": engine_names, "precision": lambda: PRECISIONS, "cache": policy_names}


def _one_of(field: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        allowed = CHOICES[field]()
        if value not in allowed:
            raise ValueError(f"{field} must be one of {', '.join(allowed)}, not {value!r}")
        return value
    return check


EngineName = Annotated[str, AfterValidator(_one_of("engine"))]
Precision = Annotated[str, AfterValidator(_one_of("precision"))]
CachePolicy = Annotated[str, AfterValidator(_one_of("cache"))]


class ModelEntry(BaseModel):
    """One served model in the config file's `models` list; unset keys take the
    server-wide settings."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="'builtin' or a local diffusers folder")
    name: str | None = Field(None, description="name clients use (default: folder name)")
    engine: EngineName | None = None
    precision: Precision | None = None
    device: str | None = None
    default_steps: int | None = Field(None, ge=1, le=100)
    image_size: int | None = Field(None, ge=8, le=4096)
    cache: CachePolicy | None = None
    quantization: Literal["static", "dynamic"] | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPSERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model: str = Field("builtin", description="'builtin', or a local diffusers folder to serve "
                                              "(served under the folder's name)")
    models: list[ModelEntry] = Field(
        default_factory=list, description="several served models (config file); "
        "the first is the default; empty: serve --model alone")
    model_alias: str | None = Field(None, description="name clients use for --model "
                                                      "(default: 'builtin' or the folder's)")
    image_size: int | None = Field(
        None, ge=8, le=4096, description="diffusers folders: output size (default: the model's)")
    engine: EngineName = Field("torch", description="denoiser engine")
    precision: Precision = Field(
        "fp32", description="numeric precision of the denoiser (int8: onnxruntime, tensorrt, "
        "or torch with torchao int8 weights; fp8: tensorrt on Hopper)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    batching: Literal["step", "request"] = Field(
        "step", description="step-level continuous batching or whole-request batching")
    max_batch_size: int = Field(32, ge=1, le=1024, description="most images in one forward")
    max_queue: int = Field(256, ge=1, description="most requests waiting or running; then 429")
    aging_s: float = Field(5.0, gt=0, description="seconds of waiting worth one priority level")
    queue_share: float = Field(
        0.5, gt=0, le=1, description="most of the queue one API key (or client address) may "
        "hold, by cost: images x steps, of max_queue x default_steps")
    slo_s: float | None = Field(
        None, gt=0, le=3600, description="deadline (s) of requests that send no timeout: "
        "admission refuses what would miss it, and rows that can no longer meet it leave")
    deadlines: Literal["forecast", "off"] = Field(
        "forecast", description="forecast: refuse what would miss its deadline, drop rows "
        "that can no longer meet it, earliest deadline first; off: admit everything (only "
        "the timeout ends a request; for comparison)")
    live_state_mb: float = Field(
        1024, gt=0, description="most live request state (latents, prompt encodings, cache "
        "history) kept on the device; past it paused requests' state moves to host memory "
        "(GPU engines, --offload) or new requests wait for admission")
    offload: Literal["auto", "on", "off"] = Field(
        "auto", description="move paused requests' state to host memory past live_state_mb "
        "(auto: on GPU engines; off: new requests wait instead)")
    default_steps: int = Field(4, ge=1, le=100, description="steps when a request names none")
    max_steps: int = Field(64, ge=1, le=100, description="most steps a request may ask for")
    url_ttl_s: float = Field(3600.0, gt=0, description="how long url results stay fetchable")
    compile: bool = Field(False, description="torch.compile the denoiser")
    cache: CachePolicy = Field(
        "none", description="default step-cache policy (a request's `cache` field overrides)")
    quantization: Literal["static", "dynamic"] = Field(
        "static", description="int8 with onnxruntime: static QDQ (calibrated) or dynamic")
    ort_providers: list[str] | None = Field(
        None, description="onnxruntime execution providers in order (default from device)")
    ort_opt_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level")
    build_dir: Path | None = Field(
        None, description="engine build cache (default ~/.cache/stepserve/builds)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    warmup_batch_sizes: list[int] = Field([1, 8], description="batch sizes run at start-up")
    drain_timeout_s: float = Field(120.0, gt=0, description="SIGTERM: wait this long for work")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header value on 429")
    keep_alive_s: float = Field(
        75.0, gt=0, description="idle HTTP keep-alive; above load-balancer and client idle times")
    result_cache_mb: float = Field(
        256.0, ge=0, description="exact result cache size (requests with a seed); 0: off")
    result_cache_ttl_s: float = Field(3600.0, gt=0, description="how long cached results live")
    text_cache_size: int = Field(4096, ge=1, description="prompts kept by the text-encoder LRU")
    text_cache_mb: float = Field(64.0, gt=0, description="memory the text-encoder LRU may hold")
    lora_dirs: list[Path] = Field(
        default_factory=lambda: [BUILTIN_LORA_DIR], description="folders of LoRA adapters "
        "(NAME.safetensors or NAME/pytorch_lora_weights.safetensors); requests name them, "
        "never a path (default: the built-in model's adapters)")
    lora_batching: Literal["mixed", "split"] = Field(
        "mixed", description="mixed: rows with different adapters share one forward; split: "
        "only requests with the same adapters and scales do (the peers' way, to compare)")
    lora_cache_mb: float = Field(
        256.0, gt=0, description="LoRA weights kept loaded, least recently used out first")
    max_loras_per_request: int = Field(4, ge=0, le=16, description="adapters one request "
                                       "may apply at once (0: LoRA off)")
    max_image_pixels: int = Field(
        16_777_216, ge=1, description="largest edit source or mask, in pixels (4096x4096)")
    max_body_mb: float = Field(
        8.0, gt=0, description="largest request body; a larger one gets 413 before it is read")
    jobs_max_mb: float = Field(
        128.0, gt=0, description="encoded results of async jobs kept in memory; when full, "
        "fetched results go first and new jobs get 429")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not complete this long after its headers "
        "gets 408 (and the connection is closed)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection whose request headers take longer is closed")
    max_connections: int = Field(
        1024, ge=1, description="open HTTP connections; more are closed as they open")
    max_jobs: int = Field(10000, ge=1, description="async jobs kept in memory (any state)")
    url_results_max_mb: float = Field(
        128.0, gt=0, description="images kept for response_format=url, in all")
    url_results_per_key_mb: float = Field(
        32.0, gt=0, description="url images one API key (or client address) may keep; beyond "
        "it its own oldest go first, never another key's")
    public_base_url: str | None = Field(
        None, description="base of url results, e.g. https://images.example.com (default: "
        "the request's Host if it is in allowed_hosts, else a root-relative url)")
    allowed_hosts: list[str] = Field(
        ["localhost", "127.0.0.1", "::1"], description="Host headers trusted for url results "
        "when public_base_url is not set")
    auth_internal: bool = Field(
        False, description="with API keys: also require one for /metrics, /docs, /openapi.json")
    forwarded_allow_ips: list[str] = Field(
        ["127.0.0.1"], description="proxies whose X-Forwarded-For names the client (for "
        "per-address limits behind a load balancer); '*' trusts any")
    auth_failures_per_min: float = Field(
        30.0, gt=0, description="failed API-key attempts a client address may make per minute; "
        "then 429")
    log_level: str = Field("info", description="uvicorn log level")
    api_keys: list[str] = Field(default_factory=list,
                                description="accepted bearer keys (empty: no auth)")
    api_keys_file: Path | None = Field(None, description="file with one API key per line")
    rate_limit_rps: float = Field(0.0, ge=0, description="requests/s per API key (0: none)")
    rate_limit_burst: int | None = Field(None, ge=1, description="bucket size per key")
    redis_url: str | None = Field(None, description="Redis for the scale-out roles "
                                                    "(stepserve api / worker)")
    visibility_timeout_s: float = Field(
        30.0, gt=0, description="worker: a job whose worker is silent this long is re-run")

    _config_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls._config_file
        if path is not None:
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif path.suffix == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                raise ValueError(f"config file must be .toml or .json: {path}")
        return tuple(sources)

    @property
    def model_name(self) -> str:
        """The name clients use in `model`: the alias, 'builtin' or the folder's name."""
        if self.model_alias:
            return self.model_alias
        return "builtin" if self.model == "builtin" else Path(self.model).name

    def per_model(self) -> list[Settings]:
        """One settings object per served model (the flat settings when `models` is empty)."""
        if not self.models:
            return [self]
        out = []
        for entry in self.models:
            update = {k: v for k, v in entry.model_dump().items()
                      if v is not None and k not in ("path", "name")}
            out.append(self.model_copy(update={**update, "model": entry.path,
                                               "model_alias": entry.name, "models": []}))
        names = [s.model_name for s in out]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must be unique: {names}")
        return out

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> Settings:
        """Build settings; `flags` holds only the flags the user actually passed."""
        config_file = config_file or os.environ.get("STEPSERVE_CONFIG")
        path = Path(config_file) if config_file else None
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        cls._config_file = path
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        finally:
            cls._config_file = None
