"""The sampling contract the scheduler drives, for flow-matching engines of the built-in
model: per-request SamplerState (models/sampling/state.py) advanced by one batched
forward of the engine's `denoise` (and `denoise_cached` for block caches).

Other model families (diffusers adapters) implement the same three methods with
their own per-request state.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepserve.models.builtin.text import TextBatch
from stepserve.models.caches.config import CacheConfig
from stepserve.models.sampling import state as flow
from stepserve.models.sampling.paradigms import PicardState, picard_init, picard_round


class FlowSampling:
    samplers = flow.SAMPLERS
    default_sampler = "euler"

    def init_state(self, seed: int, steps: int, cond: TextBatch, uncond: TextBatch, *,
                   guidance: float, sampler: str = "euler",
                   cache: CacheConfig | None = None) -> flow.SamplerState:
        info = self.info  # type: ignore[attr-defined]
        return flow.init_state(seed, steps, cond, uncond, shape=info.image_shape,
                               guidance=guidance, sampler=sampler,
                               time_shift=info.time_shift, qsched=info.qsched, cache=cache)

    def step_batch(self, states: Sequence[flow.SamplerState]) -> list[flow.SamplerState]:
        """At most ONE forward; states whose cache skips this step take no row in it."""
        return flow.step_batch(self.denoise, states,  # type: ignore[attr-defined]
                               block_denoiser=getattr(self, "denoise_cached", None))

    @staticmethod
    def needs_forward(state: flow.SamplerState) -> bool:
        return flow.needs_forward(state)

    # latency mode: ParaDiGMS Picard rounds for a request alone on the server
    def picard_init(self, state: flow.SamplerState) -> PicardState:
        return picard_init(state, window=8, tol=1e-3)

    def picard_round(self, p: PicardState) -> PicardState:
        return picard_round(self.denoise, p)  # type: ignore[attr-defined]
