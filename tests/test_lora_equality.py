"""LoRA adapters applied per row in one batched forward equal diffusers' own
`load_lora_weights` + `set_adapters` (tiny random-weight folders: a U-Net with conv
adapters, and two DiTs: SD3 and FLUX), and a mixed batch equals each request alone."""

import numpy as np
import pytest
import torch

from fakes import finish

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from stepserve.engines.diffusers_engine import DiffusersEngine  # noqa: E402
from stepserve.models.caches.config import CacheConfig  # noqa: E402
from stepserve.models.families.tiny import tiny_flux, tiny_sd, tiny_sd3  # noqa: E402
from stepserve.models.lora.library import LoraLibrary  # noqa: E402
from stepserve.models.lora.testing import random_adapter  # noqa: E402
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore  # noqa: E402
from stepserve.server.scheduler.request import (  # noqa: E402
    GenerationParams,
    LoraChoice,
    Request,
)

TARGETS = {"sd": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
           "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.2"],
           "flux": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "ff.net.2"]}
BUILDERS = {"sd": tiny_sd, "sd3": tiny_sd3, "flux": tiny_flux}
SIZES = {"flux": 16}  # FLUX folders have no native size


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = BUILDERS[request.param](root / "model")
    loras = root / "loras"
    for i, (name, rank) in enumerate([("x", 4), ("y", 8), ("z", 2)]):
        random_adapter(folder, loras / name, TARGETS[request.param], rank, seed=i,
                       alpha=2.0 * rank if name == "y" else None, std=2.0)
    engine = DiffusersEngine("tiny", folder, image_size=SIZES.get(request.param))
    engine.loras = LoraLibrary([loras])
    return folder, loras, engine


def reference(folder, loras, prompt, seed, steps, guidance, adapters):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in adapters:
        pipe.load_lora_weights(str(loras / name), adapter_name=name)
    if adapters:
        pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
    extra = {"height": 16, "width": 16} if "Flux" in type(pipe).__name__ else {}
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="np",
               **extra).images[0]
    return (out * 255).round().astype(np.uint8)


def run(engine, requests, cache=None):
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=16))
    for rid, (prompt, seed, steps, g, adapters) in requests.items():
        core.submit(Request(rid, GenerationParams(
            prompt, steps, seed, g, cache=cache,
            lora=tuple(LoraChoice(n, s) for n, s in adapters)), 0.0))
    return finish(core)  # a failed request has no image: the caller's lookup fails


REQUESTS = {"plain": ("a red circle", 1, 3, 4.0, ()),
            "x": ("a blue square", 2, 3, 4.0, (("x", 1.0),)),
            "y-half": ("a red circle", 3, 3, 1.0, (("y", 0.5),)),
            "xz": ("green", 4, 3, 4.0, (("x", 0.8), ("z", 1.3)))}


def test_mixed_batch_equals_diffusers_with_each_requests_adapters(family):
    folder, loras, engine = family
    images = run(engine, REQUESTS)
    for rid, (prompt, seed, steps, g, adapters) in REQUESTS.items():
        ref = reference(folder, loras, prompt, seed, steps, g, adapters)
        diff = np.abs(images[rid].astype(int) - ref.astype(int)).max()
        assert diff <= 1, (rid, diff)


def test_the_adapters_change_the_denoised_latents(family):
    """Else the equalities prove nothing (tiny VAEs squash most latent change)."""
    _, _, engine = family
    text = engine.encode(["a red circle", ""])
    states = [engine.init_state(1, 3, text.select([0]), text.select([1]), guidance=4.0,
                                lora=lora) for lora in ([], [("x", 1.0)], [("x", 0.5)])]
    while not states[0].done:
        states = engine.step_batch(states)
    plain, full, half = (s.x for s in states)
    assert (full - plain).abs().mean() > 0.1 * plain.abs().mean()
    images = engine.decode(torch.stack([plain, full]))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 16
    assert (half - plain).abs().mean() < (full - plain).abs().mean()


def test_mixed_batch_equals_each_request_alone(family):
    _, _, engine = family
    together = run(engine, REQUESTS)
    for rid, spec in REQUESTS.items():
        alone = run(engine, {rid: spec})[rid]
        assert np.abs(alone.astype(int) - together[rid].astype(int)).max() <= 1, rid


def test_adapter_rows_keep_their_deepcache_in_a_mixed_batch(family):
    """DeepCache runs the deep blocks on a subset of rows: each row keeps its adapters."""
    _, _, engine = family
    if not engine.family.unet:
        pytest.skip("DeepCache is for U-Nets")
    cache = CacheConfig.parse({"policy": "deepcache", "interval": 2})
    requests = {k: (p, seed, 5, g, a) for k, (p, seed, _, g, a) in REQUESTS.items()}
    together = run(engine, requests, cache)
    uncached = run(engine, {"x": requests["x"]})["x"]
    assert np.abs(uncached.astype(int) - together["x"].astype(int)).max() > 0  # it reused
    for rid, spec in requests.items():
        alone = run(engine, {rid: spec}, cache)[rid]
        assert np.abs(alone.astype(int) - together[rid].astype(int)).max() <= 1, rid


def test_kohya_named_files_are_converted_by_diffusers_own_converter(family, tmp_path):
    folder, loras, engine = family
    if not engine.family.unet:
        pytest.skip("the kohya names here are a U-Net's")
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    peft = load_file(str(loras / "x" / "pytorch_lora_weights.safetensors"))
    kohya = convert_state_dict_to_kohya(peft)
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in kohya)
    save_file(kohya, str(tmp_path / "x-kohya.safetensors"))
    engine.loras = LoraLibrary([loras, tmp_path])
    try:
        images = run(engine, {"peft": REQUESTS["x"],
                              "kohya": REQUESTS["x"][:4] + ((("x-kohya", 1.0),),)})
    finally:
        engine.loras = LoraLibrary([loras])
    assert np.abs(images["peft"].astype(int) - images["kohya"].astype(int)).max() <= 1
