"""Prometheus metrics (prometheus-client); names are stepserve_* with units."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .scheduler.core import StepStats
from .scheduler.request import Request, Status

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def tenant_label(tenant: str) -> str:
    """A bounded, non-secret label: keys by a short prefix of their id; client addresses
    (no auth) all as 'anonymous'."""
    return f"key-{tenant[4:12]}" if tenant.startswith("key:") else "anonymous"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lora_fallback_rows = Counter(
            "stepserve_lora_fallback_rows", "Denoiser rows with LoRA adapters that a graph "
            "engine (onnxruntime, TensorRT, compiled torch) ran through eager torch", registry=r)
        self.deadline_dropped = Counter(
            "stepserve_deadline_dropped", "Requests dropped once their deadline became "
            "unreachable (before costing more forwards)", registry=r)
        self.deadline_requests = Counter(
            "stepserve_deadline_requests", "Admitted requests with a deadline (a timeout or "
            "slo_s), by outcome: met (finished in time) or missed (timed out or dropped)",
            ["outcome"], registry=r)
        self.deadline_refused = Counter(
            "stepserve_deadline_refused", "Requests refused at admission because they would "
            "miss their deadline: late (429, the work ahead) or unreachable (504)",
            ["reason"], registry=r)
        self.quality_requests = Counter(
            "stepserve_quality_requests", "Finished requests that named a `quality`, by the "
            "level asked and the plan run (auto: asked, high, medium or low)",
            ["quality", "level"], registry=r)
        self.quality_degraded = Counter(
            "stepserve_quality_degraded", "Finished auto requests run below what they asked, "
            "by plan level and reason: load (chosen at admission) or behind (safe cache "
            "switched on part-way)", ["level", "reason"], registry=r)
        self.forecast_ratio = Histogram(
            "stepserve_finish_forecast_ratio", "Actual / predicted time to finish of requests "
            "admitted with a forecast (1 = exact; above 1: later than predicted)",
            buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4), registry=r)
        self.out_of_vocabulary = Counter(
            "stepserve_prompt_out_of_vocabulary", "Prompts that named nothing the model "
            "knows (served, with a warning)", registry=r)
        self.preemptions = Counter(
            "stepserve_preemptions", "Requests left out of a forward after running in the "
            "last one (higher-ranked work took the batch)", registry=r)
        self.paused_rows = Gauge("stepserve_paused_rows", "Rows of running requests left "
                                 "out of the last forward", registry=r)
        self.paused_s = Histogram("stepserve_paused_seconds", "How long a preempted request "
                                  "stayed paused before its next forward",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.offloaded_rows = Counter(
            "stepserve_state_offload_rows", "Rows whose paused state moved to host memory "
            "(out) or back before their forward (in)", ["direction"], registry=r)
        self.state_waits = Counter(
            "stepserve_live_state_waits", "Admission steps a request waited because the "
            "live-state budget (live_state_mb) was full", registry=r)
        self.live_bytes = Gauge("stepserve_live_state_bytes", "Live request state on the "
                                "device after the last step", registry=r)
        self.requests = Counter("stepserve_requests", "Finished image requests by status",
                                ["status"], registry=r)
        self.latency = Histogram("stepserve_request_latency_seconds",
                                 "End-to-end latency of image requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("stepserve_queue_wait_seconds",
                                    "Time from arrival to the first denoiser step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_preview = Histogram("stepserve_time_to_first_preview_seconds",
                                       "Time from arrival to the first streamed preview",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("stepserve_denoiser_batch_size",
                                    "Samples (images) per denoiser forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.forward_s = Histogram("stepserve_denoiser_forward_seconds",
                                   "Wall time of one batched denoiser forward",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("stepserve_denoising_steps", "Per-image denoising steps executed",
                             registry=r)
        self.queue_depth = Gauge("stepserve_queue_depth", "Requests waiting for admission",
                                 registry=r)
        self.running = Gauge("stepserve_running_requests", "Requests being denoised",
                             registry=r)
        self.images = Counter("stepserve_images_generated", "Images generated", registry=r)
        self.tenant_requests = Counter(
            "stepserve_tenant_requests", "Finished or refused image requests per tenant: "
            "'key-' and the first 8 hex digits of an API key's SHA-256 id, or 'anonymous'",
            ["tenant", "status"], registry=r)
        self.result_cache = Counter("stepserve_result_cache_lookups",
                                    "Exact result cache lookups (seeded requests) by outcome",
                                    ["outcome"], registry=r)
        self.cache_skipped = Counter("stepserve_cache_skipped_steps",
                                     "Per-image denoiser steps a step cache predicted instead "
                                     "of computing", ["policy"], registry=r)
        self.cache_skipped_blocks = Counter("stepserve_cache_skipped_blocks",
                                            "DiT blocks (per image row) a block cache reused "
                                            "instead of computing", ["policy"], registry=r)
        self.text_cache_hits = Counter("stepserve_text_encoder_cache_hits",
                                       "Prompts served from the text-encoder cache",
                                       registry=r)
        self.text_cache_misses = Counter("stepserve_text_encoder_cache_misses",
                                         "Prompts the text encoder had to encode", registry=r)
        self.gpu_memory = Gauge("stepserve_gpu_memory_bytes",
                                "GPU memory held by tensors (0 without a GPU)", registry=r)
        self.ready = Gauge("stepserve_ready", "1 once the model is loaded and warm",
                           registry=r)
        self.warmup_s = Gauge("stepserve_warmup_seconds", "Model load and warm-up time",
                              registry=r)
        self.build_s = Gauge("stepserve_engine_build_seconds",
                             "Engine export / compile / quantize time paid at start-up "
                             "(0 when the build came from the cache)", registry=r)

    def observe_step(self, stats: StepStats) -> None:
        for policy, n in stats.skipped.items():
            self.cache_skipped.labels(policy=policy).inc(n)
        for policy, n in stats.skipped_blocks.items():
            self.cache_skipped_blocks.labels(policy=policy).inc(n)
        if stats.dropped:
            self.deadline_dropped.inc(stats.dropped)
        for req in stats.finished:
            self.observe_finished(req)
        self.preemptions.inc(stats.preempted)
        for seconds in stats.paused_s:
            self.paused_s.observe(seconds)
        if stats.batch_requests:
            self.paused_rows.set(stats.paused_rows)
        self.offloaded_rows.labels(direction="out").inc(stats.offloaded_rows)
        self.offloaded_rows.labels(direction="in").inc(stats.restored_rows)
        self.state_waits.inc(stats.state_waits)
        self.live_bytes.set(stats.live_bytes)
        if stats.batch_samples:
            self.batch_size.observe(stats.batch_samples)
            self.forward_s.observe(stats.forward_s)
            self.steps.inc(stats.batch_samples)

    def observe_finished(self, req: Request) -> None:
        if req.status is not Status.FINISHED:
            return
        p = req.params
        if p.quality is not None:
            self.quality_requests.labels(quality=p.quality, level=p.level or p.quality).inc()
        if req.degraded is not None:
            self.quality_degraded.labels(level=p.level or "", reason=req.degraded).inc()
        if req.predicted_s:
            self.forecast_ratio.observe((req.last_served - req.arrival) / req.predicted_s)

    def watch(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Gauges read at scrape time, so they are right even while the core is idle."""
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_memory.set_function(lambda: float(torch.cuda.memory_allocated()))
        except ImportError:  # the API role may run without torch
            pass
