"""diffusers families inside the step-level scheduler: the adapter's images equal the
pipeline's own __call__ (same seed, steps, scheduler), also when batched with requests
at other steps, and the folder is served through the API."""

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from stepserve.engines.diffusers_engine import DiffusersEngine  # noqa: E402
from stepserve.models.families.tiny import (  # noqa: E402
    tiny_flux,
    tiny_pixart,
    tiny_sd,
    tiny_sd3,
    tiny_sdxl,
)
from stepserve.server.app import create_app  # noqa: E402
from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore  # noqa: E402
from stepserve.server.scheduler.events import Completed  # noqa: E402
from stepserve.server.scheduler.offline import generate_offline  # noqa: E402
from stepserve.server.scheduler.request import GenerationParams, Request  # noqa: E402
from stepserve.server.settings import Settings  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "green"]


BUILDERS = {"sd-epsilon": lambda f: tiny_sd(f, "epsilon"),
            "sd-v": lambda f: tiny_sd(f, "v_prediction"),
            "sdxl": tiny_sdxl,
            "lcm": lambda f: tiny_sd(f, lcm=True),
            "pixart": tiny_pixart,
            "pixart-alpha": lambda f: tiny_pixart(f, alpha=True),
            "sd3": tiny_sd3,
            "flux-schnell": tiny_flux,
            "flux-dev": lambda f: tiny_flux(f, guidance_embeds=True)}
SIZES = {"flux-schnell": 16, "flux-dev": 16}  # FLUX folders have no native size: choose one


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def sd(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "tiny-sd")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    engine = DiffusersEngine("tiny-sd", folder, image_size=SIZES.get(request.param))
    return folder, pipe, engine


def reference(pipe, prompt, seed, steps, guidance):
    name = type(pipe).__name__
    extra = ({"use_resolution_binning": False, "clean_caption": False} if "PixArt" in name
             else {"height": 16, "width": 16} if "Flux" in name else {})
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="np",
               **extra).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_adapter_equals_the_pipeline(sd, guidance):
    _, pipe, engine = sd
    ours = generate_offline(engine, PROMPTS[:2], [1, 2], 3, guidance=guidance)
    for image, prompt, seed in zip(ours, PROMPTS[:2], [1, 2]):
        ref = reference(pipe, prompt, seed, 3, guidance)
        assert np.abs(image.astype(int) - ref.astype(int)).max() <= 1


def test_adapter_equals_the_pipeline_when_batched_with_other_steps(sd):
    _, pipe, engine = sd
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    core.submit(Request("a", GenerationParams(PROMPTS[0], 5, 7, 3.0), 0.0))
    core.step()
    core.step()  # "a" is two steps in when "b" (other steps, no guidance) joins
    core.submit(Request("b", GenerationParams(PROMPTS[2], 3, 8, 1.0), 1.0))
    images = {}
    while core.has_work:
        for e in core.step():
            if isinstance(e, Completed):
                images[e.request_id] = e.images[0]
    for rid, (prompt, seed, steps, g) in {"a": (PROMPTS[0], 7, 5, 3.0),
                                          "b": (PROMPTS[2], 8, 3, 1.0)}.items():
        ref = reference(pipe, prompt, seed, steps, g)
        assert np.abs(images[rid].astype(int) - ref.astype(int)).max() <= 1


def test_folder_is_served_through_the_api(sd):
    folder, pipe, engine = sd
    app = create_app(Settings(model=str(folder), warmup_batch_sizes=[1],
                              image_size=engine.size))
    app.state.runtime.start(background=False)
    assert app.state.runtime.error is None, app.state.runtime.error

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            models = (await c.get("/v1/models")).json()
            r = await c.post("/v1/images/generations",
                             json={"model": "tiny-sd", "prompt": PROMPTS[1], "seed": 3,
                                   "num_inference_steps": 2, "guidance_scale": 2.0})
            wrong = await c.post("/v1/images/generations", json={"model": "builtin",
                                                                 "prompt": "x"})
            return models, r, wrong

    try:
        models, r, wrong = asyncio.run(go())
    finally:
        app.state.runtime.shutdown()
    assert models["data"][0]["id"] == "tiny-sd"
    assert r.status_code == 200, r.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
                       .convert("RGB"))
    assert np.abs(image.astype(int) - reference(pipe, PROMPTS[1], 3, 2, 2.0).astype(int)
                  ).max() <= 1
    assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "model"


def test_not_a_folder_fails_readiness_clearly(tmp_path):
    app = create_app(Settings(model=str(tmp_path)))
    app.state.runtime.start(background=False)
    assert "not 'builtin' and not a diffusers folder" in app.state.runtime.error


@pytest.mark.parametrize("sampler,scheduler", [("dpm++2m", "DPMSolverMultistepScheduler"),
                                               ("unipc", "UniPCMultistepScheduler"),
                                               ("euler-a", "EulerAncestralDiscreteScheduler")])
def test_samplers_equal_the_pipeline_with_that_scheduler(tmp_path_factory, sampler,
                                                         scheduler):
    import diffusers

    folder = tiny_sd(tmp_path_factory.mktemp("samplers") / "tiny-sd")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    engine = DiffusersEngine("tiny-sd", folder)
    ours = generate_offline(engine, PROMPTS[:2], [4, 5], 4, guidance=2.0, sampler=sampler)
    for image, prompt, seed in zip(ours, PROMPTS[:2], [4, 5]):
        ref = reference(pipe, prompt, seed, 4, 2.0)
        assert np.abs(image.astype(int) - ref.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="sampler"):
        engine.init_state(0, 2, None, None, guidance=1.0, sampler="ddim-x")


def test_previews_use_taesd_when_the_folder_has_one(tmp_path_factory):
    from diffusers import AutoencoderTiny

    folder = tiny_sd(tmp_path_factory.mktemp("taesd") / "tiny-sd")
    plain = DiffusersEngine("tiny-sd", folder)
    core = SchedulerCore(plain, SchedulerConfig(max_batch_size=4))
    core.submit(Request("a", GenerationParams(PROMPTS[0], 4, 1, 1.0, partial_images=2), 0.0))
    previews = []
    while core.has_work:
        previews += [e for e in core.step() if type(e).__name__ == "Preview"]
    assert [p.step for p in previews] == [1, 3] and previews[0].images.shape == (1, 32, 32, 3)
    AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=4,
                    encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(
        folder / "taesd", safe_serialization=True)
    with_taesd = DiffusersEngine("tiny-sd", folder)
    assert with_taesd.taesd is not None
    x0 = torch.randn(1, 4, 16, 16)
    a, b = plain.preview(x0), with_taesd.preview(x0)
    assert a.shape == b.shape == (1, 32, 32, 3) and not np.array_equal(a, b)


def test_several_models_are_served_and_routed_by_name(tmp_path_factory):
    from stepserve.server.settings import ModelEntry

    folder = tiny_sd(tmp_path_factory.mktemp("multi") / "tiny-sd")
    settings = Settings(warmup_batch_sizes=[1], models=[
        ModelEntry(path="builtin"), ModelEntry(path=str(folder), name="tiny", default_steps=2)])
    app = create_app(settings)
    app.state.runtime.start(background=False)
    assert app.state.runtime.error is None, app.state.runtime.error

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            names = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            default = await c.post("/v1/images/generations", json={"prompt": "a red circle"})
            tiny = await c.post("/v1/images/generations",
                                json={"prompt": "a red circle", "model": "tiny"})
            other = await c.post("/v1/images/generations",
                                 json={"prompt": "x", "model": "nope"})
            return names, default, tiny, other

    try:
        names, default, tiny, other = asyncio.run(go())
    finally:
        app.state.runtime.shutdown()
    assert names == ["builtin", "tiny"]
    assert default.status_code == 200 and tiny.status_code == 200
    assert default.json()["size"] == "32x32" and tiny.json()["size"] == "32x32"
    assert other.status_code == 404 and "builtin, tiny" in other.json()["error"]["message"]
    with pytest.raises(ValueError, match="unique"):
        Settings(models=[ModelEntry(path="builtin"), ModelEntry(path="builtin")]).per_model()


def test_custom_timesteps_sigmas_and_ays_equal_the_pipeline(tmp_path_factory):
    from diffusers import DiffusionPipeline
    from diffusers.schedulers import AysSchedules

    folder = tiny_sd(tmp_path_factory.mktemp("ays") / "tiny-sd")
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    app = create_app(Settings(model=str(folder), warmup_batch_sizes=[1]))
    app.state.runtime.start(background=False)
    ays = [int(t) for t in AysSchedules["StableDiffusionTimesteps"]]
    cases = [({"timesteps": [999, 700, 400, 100]}, {"timesteps": [999, 700, 400, 100]}),
             ({"sigmas": [14.6, 4.0, 1.0, 0.3, 0.0]}, {"sigmas": [14.6, 4.0, 1.0, 0.3, 0.0]}),
             ({"schedule": "ays"}, {"timesteps": ays})]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            out = [await c.post("/v1/images/generations",
                                json={"prompt": PROMPTS[0], "seed": 9, "guidance_scale": 1.0,
                                      **body}) for body, _ in cases]
            bad = [await c.post("/v1/images/generations", json={"prompt": "x", **body})
                   for body in ({"timesteps": [100, 400]},
                                {"sigmas": [3.0, 0.0], "sampler": "dpm++2m"},
                                {"timesteps": [999], "sigmas": [1.0, 0.0]})]
            return out, bad

    try:
        out, bad = asyncio.run(go())
    finally:
        app.state.runtime.shutdown()
    for r, (_, kwargs) in zip(out, cases):
        assert r.status_code == 200, r.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(
            r.json()["data"][0]["b64_json"]))).convert("RGB")).astype(int)
        ref = pipe(PROMPTS[0], guidance_scale=1.0, generator=torch.Generator().manual_seed(9),
                   output_type="np", **kwargs).images[0]
        assert np.abs(image - (ref * 255).round().astype(int)).max() <= 1
    assert [b.status_code for b in bad] == [400, 400, 400]
    assert [b.json()["error"]["param"] for b in bad] == ["timesteps", "sigmas", "timesteps"]


def test_ab_cache_works_for_diffusers_models(tmp_path_factory):
    from stepserve.models.caches.config import CacheConfig

    folder = tiny_sd(tmp_path_factory.mktemp("abcache") / "tiny-sd")
    engine = DiffusersEngine("tiny-sd", folder)
    calls = []
    denoise = engine.family.denoise
    engine.family.denoise = lambda x, *a: calls.append(len(x)) or denoise(x, *a)
    ref = generate_offline(engine, PROMPTS[:2], [3, 4], 8, guidance=2.0).astype(float)
    full = sum(calls)
    calls.clear()
    cached = generate_offline(engine, PROMPTS[:2], [3, 4], 8, guidance=2.0,
                              cache=CacheConfig("ab-cache", interval=2)).astype(float)
    assert sum(calls) == full * 5 // 8  # computes steps 0, 2, 4, 6, 7 of 8
    assert np.linalg.norm(cached - ref) / np.linalg.norm(ref) < 0.1


@pytest.mark.parametrize("builder", [tiny_sd, tiny_sdxl])
def test_deepcache_forward_is_exact_without_reuse_and_reuses_deep_features(
        builder, tmp_path_factory):
    from stepserve.models.caches.config import CacheConfig
    from stepserve.models.caches.deepcache import deepcache_forward

    folder = builder(tmp_path_factory.mktemp("deepcache") / "tiny")
    engine = DiffusersEngine("tiny", folder)
    fam = engine.family
    cond = engine.encode(PROMPTS[:2])
    x = torch.randn(2, *fam.latent_shape(engine.size))
    t = torch.tensor([900.0, 300.0])
    kwargs = fam.unet_inputs(x, cond, torch.ones(2))
    with torch.inference_mode():
        ref = fam.pipe.unet(x, t, **kwargs, return_dict=False)[0]
        out, feats = deepcache_forward(fam.pipe.unet, x, t, **kwargs)
        assert torch.allclose(out, ref, atol=1e-5)
        # reusing the features of this very step gives the same output
        again, _ = deepcache_forward(fam.pipe.unet, x, t, **kwargs,
                                     reuse=torch.tensor([True, False]), cached=feats)
        assert torch.allclose(again, ref, atol=1e-5)
    # through the scheduler: close to no cache, deep blocks skipped, other requests exact
    plain = generate_offline(engine, PROMPTS[:2], [1, 2], 8, guidance=2.0).astype(float)
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    core.submit(Request("c", GenerationParams(PROMPTS[0], 8, 1, 2.0,
                                              cache=CacheConfig("deepcache", interval=2)), 0))
    core.submit(Request("p", GenerationParams(PROMPTS[1], 8, 2, 2.0), 0))
    images, skipped = {}, 0.0
    while core.has_work:
        for e in core.step():
            if isinstance(e, Completed):
                images[e.request_id] = e.images[0].astype(float)
        skipped += sum(core.last_stats.skipped_blocks.values())
    assert skipped > 0
    assert np.abs(images["p"] - plain[1]).max() <= 1
    assert np.linalg.norm(images["c"] - plain[0]) / np.linalg.norm(plain[0]) < 0.2
