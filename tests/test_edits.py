"""Edits in the one batched step (issue 15, first part): img2img starts part-way down
the schedule, inpainting keeps the unmasked region on the source's trajectory; both
share forwards with generations."""

import numpy as np
import pytest
import torch

from fakes import finish
from stepserve.models.builtin.shapes import to_uint8
from stepserve.models.sampling.edit import Edit, composite, start_step
from stepserve.models.sampling.state import init_state, run_to_completion, step_batch


@pytest.fixture(scope="module")
def source():
    from stepserve.models.builtin.shapes import render, sample_scene

    scene = sample_scene(np.random.default_rng(0), shape="circle", colour="red",
                         background="white")
    return render([scene])[0]


def state(engine, seed, steps, edit=None, prompt="a large blue circle in the center"):
    text = engine.encode([prompt, ""])
    info = engine.info
    return init_state(seed, steps, text.select([0]), text.select([1]),
                      shape=info.image_shape, time_shift=info.time_shift, edit=edit)


def test_start_step_follows_diffusers_img2img():
    assert [start_step(8, s) for s in (1.0, 0.75, 0.5, 0.3, 0.01)] == [0, 2, 4, 6, 7]


def test_full_strength_is_a_generation_and_lower_starts_later(engine, source):
    gen = state(engine, 3, 8)
    full = state(engine, 3, 8, Edit(source, strength=1.0))
    assert full.step == 0 and torch.equal(full.x, gen.x)
    half = state(engine, 3, 8, Edit(source, strength=0.5))
    assert half.step == 4 and not torch.equal(half.x, gen.x)
    out = run_to_completion(engine.denoise, [half])[0]
    assert out.done and out.step == 8


def test_edits_batched_with_generations_equal_each_alone(engine, source):
    specs = [(1, 8, None), (2, 8, Edit(source, 0.6)), (3, 6, Edit(source, 0.9)),
             (4, 4, Edit(source, 0.5, mask=np.zeros((32, 32), bool)))]
    alone = [run_to_completion(engine.denoise, [state(engine, s, n, e)])[0].x
             for s, n, e in specs]
    states = [state(engine, s, n, e) for s, n, e in specs]
    states[0] = step_batch(engine.denoise, [states[0]])[0]  # at different steps
    mixed = run_to_completion(engine.denoise, states, max_batch=4)
    for a, m in zip(alone, mixed):
        assert torch.allclose(a, m.x, atol=1e-4)


def test_inpainting_keeps_every_pixel_outside_the_mask(engine, source):
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True  # only the right half may change
    edit = Edit(source, strength=1.0, mask=mask)
    out = run_to_completion(engine.denoise, [state(engine, 5, 6, edit)])[0]
    pixels = to_uint8(out.x[None])
    assert np.array_equal(pixels[0][~mask], source[~mask])  # exact, before any composite
    assert not np.array_equal(pixels[0][mask], source[mask])
    assert np.array_equal(composite(pixels, edit)[0][~mask], source[~mask])


def test_bad_edits_are_refused():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="strength"):
        Edit(img, strength=0.0)
    with pytest.raises(ValueError, match="mask"):
        Edit(img, mask=np.zeros((16, 16), bool))
    assert Edit(img, 0.5).digest() != Edit(img, 0.6).digest()


def test_edits_travel_through_redis_and_key_the_result_cache(source):
    pytest.importorskip("redis")
    from stepserve.engines.base import EngineInfo
    from stepserve.server.redis.codec import params_from_json, params_to_json
    from stepserve.server.result_cache import result_key
    from stepserve.server.scheduler.request import GenerationParams

    mask = np.zeros((32, 32), bool)
    mask[3:9, 20:31] = True
    p = GenerationParams("p", 8, 1, 1.0, edit=Edit(source, 0.7, mask))
    back = params_from_json(params_to_json(p)).edit
    assert np.array_equal(back.image, source) and np.array_equal(back.mask, mask)
    assert back.strength == 0.7 and back.more == ()
    two = GenerationParams("p", 8, 1, 1.0, n=2, edit=Edit(source, 0.7, more=(source[::-1],)))
    back = params_from_json(params_to_json(two)).edit
    assert len(back.more) == 1 and np.array_equal(back.more[0], source[::-1])
    assert back.row(0, 2).image is back.image and back.row(1, 2).image is back.more[0]
    info = EngineInfo("torch", "m", "fp32", "cpu", (3, 32, 32), 1.0, 1.0)
    plain = GenerationParams("p", 8, 1, 1.0)
    other = GenerationParams("p", 8, 1, 1.0, edit=Edit(source, 0.7))
    assert len({result_key(info, x) for x in (p, plain, other, two)}) == 4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diffusers_img2img_equals_the_pipeline_also_batched(family, tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import (
        DiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )
    from PIL import Image

    from stepserve.engines.diffusers_engine import DiffusersEngine
    from stepserve.models.families.tiny import tiny_sd, tiny_sdxl
    from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
    from stepserve.server.scheduler.request import GenerationParams, Request

    folder = (tiny_sd if family == "sd" else tiny_sdxl)(tmp_path_factory.mktemp(family) / "m")
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    img2img = (StableDiffusionImg2ImgPipeline if family == "sd"
               else StableDiffusionXLImg2ImgPipeline)(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    engine = DiffusersEngine("m", folder)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (engine.size, engine.size, 3), dtype=np.uint8)

    def reference(prompt, seed, steps, strength, guidance):
        out = img2img(prompt, image=Image.fromarray(src), strength=strength,
                      num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed), output_type="np")
        return (out.images[0] * 255).round().astype(np.uint8)

    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    core.submit(Request("g", GenerationParams("a blue square", 6, 3, 2.0), 0.0))
    core.step()  # a generation is one step in when the edits join
    jobs = {"a": ("a red circle", 7, 5, 0.6, 3.0), "b": ("green", 8, 4, 0.9, 1.0)}
    for rid, (prompt, seed, steps, strength, g) in jobs.items():
        core.submit(Request(rid, GenerationParams(prompt, steps, seed, g,
                                                  edit=Edit(src, strength)), 1.0))
    images = finish(core)
    for rid, args in jobs.items():
        ref = reference(*args)
        assert np.abs(images[rid].astype(int) - ref.astype(int)).max() <= 1, rid


def test_the_edit_benchmark_measures_what_it_says(engine):
    from functools import partial

    from stepserve.loadtests.edits import cost_rows
    from stepserve.models.builtin.edit_eval import cell_mask, inpaint_rows, recolour_cases
    from stepserve.server.scheduler.offline import generate_offline

    sources, prompts, labels = recolour_cases(4)
    assert all(p.split()[1] != "" for p in prompts) and labels.shape == (4, 5)
    assert cell_mask("center").sum() == 10 * 10 and cell_mask("top left").sum() == 11 * 11
    assert cell_mask("center")[15, 15] and not cell_mask("center")[5, 5]
    rows = inpaint_rows(partial(generate_offline, engine), 3, [0.75], [2])
    assert rows[0]["outside_unchanged"] == 100.0  # the composite holds every time
    cost = cost_rows(engine, [0.5], [4], n=2)
    assert cost[0]["cost_x"] == 0.5


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_checkpoints_equal_the_inpaint_pipeline(strength, tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline
    from PIL import Image

    from stepserve.engines.diffusers_engine import DiffusersEngine
    from stepserve.models.families.tiny import tiny_sd
    from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
    from stepserve.server.scheduler.request import GenerationParams, Request

    folder = tiny_sd(tmp_path_factory.mktemp("inpaint") / "m", inpaint=True)
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    engine = DiffusersEngine("m", folder)  # its warm-up is an edit: it only edits
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    editable = np.zeros((32, 32), bool)
    editable[8:24, 16:] = True
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    for rid, (seed, g) in {"a": (5, 3.0), "b": (6, 1.0)}.items():
        core.submit(Request(rid, GenerationParams("a red circle", 4, seed, g,
                                                  edit=Edit(src, strength, editable)), 0.0))
    images = finish(core)
    for rid, (seed, g) in {"a": (5, 3.0), "b": (6, 1.0)}.items():
        ref = pipe("a red circle", image=Image.fromarray(src),
                   mask_image=Image.fromarray((editable * 255).astype(np.uint8)),
                   strength=strength, num_inference_steps=4, guidance_scale=g,
                   generator=torch.Generator().manual_seed(seed), output_type="np",
                   height=32, width=32).images[0]
        ref = (ref * 255).round().astype(np.uint8)
        assert np.abs(images[rid].astype(int) - ref.astype(int)).max() <= 1, rid
    with pytest.raises(ValueError, match="inpainting model"):
        engine.init_state(0, 2, None, None, guidance=1.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_img2img_equals_the_pipeline(family, tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import DiffusionPipeline, FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    from stepserve.engines.diffusers_engine import DiffusersEngine
    from stepserve.models.families.tiny import tiny_flux, tiny_sd3
    from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
    from stepserve.server.scheduler.request import GenerationParams, Request

    folder = (tiny_sd3 if family == "sd3" else tiny_flux)(tmp_path_factory.mktemp(family) / "m")
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    img2img = (StableDiffusion3Img2ImgPipeline if family == "sd3"
               else FluxImg2ImgPipeline)(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    size = 32 if family == "sd3" else 16
    engine = DiffusersEngine("m", folder, image_size=size)
    src = np.random.default_rng(5).integers(0, 256, (size, size, 3), dtype=np.uint8)
    jobs = {"a": ("a red circle", 7, 5, 0.6, 3.0), "b": ("green", 8, 4, 0.9, 1.0)}
    core = SchedulerCore(engine, SchedulerConfig(max_batch_size=8))
    for rid, (prompt, seed, steps, strength, g) in jobs.items():
        core.submit(Request(rid, GenerationParams(prompt, steps, seed, g,
                                                  edit=Edit(src, strength)), 0.0))
    images = finish(core)
    for rid, (prompt, seed, steps, strength, g) in jobs.items():
        extra = {"height": size, "width": size}
        ref = img2img(prompt, image=Image.fromarray(src), strength=strength,
                      num_inference_steps=steps, guidance_scale=g, output_type="np",
                      generator=torch.Generator().manual_seed(seed), **extra).images[0]
        ref = (ref * 255).round().astype(np.uint8)
        assert np.abs(images[rid].astype(int) - ref.astype(int)).max() <= 1, rid


def test_eval_prints_the_edit_tables(capsys, tmp_path):
    import json

    from stepserve.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--steps", "2", "--prompts", "3", "--sets", "seen", "--edits",
                 "--edit-steps", "2", "--edit-strengths", "0.5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "edits: recolour" in text and "edits: inpaint" in text
    saved = json.loads(out.read_text())
    assert saved["inpaint"][0]["outside_unchanged"] == 100.0 and saved["rows"]
    assert main(["eval", "--steps", "2", "--prompts", "3", "--edits",
                 "--edit-strengths", "1.5"]) == 2
    assert "--edit-strengths" in capsys.readouterr().err
