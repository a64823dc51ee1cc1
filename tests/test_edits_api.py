"""POST /v1/images/edits with the official openai client (in-process), on the built-in
model: plain, streamed, masked, as a job, and every bad input as a 4xx naming it."""

import asyncio
import io

import numpy as np
import pytest
from inprocess import decode, make_app, run
from PIL import Image

from stepserve.server.app import create_app
from stepserve.server.settings import Settings

PROMPT = "a large blue circle in the center on a white background"


@pytest.fixture(scope="module")
def source():
    from stepserve.models.builtin.shapes import render, sample_scene

    scene = sample_scene(np.random.default_rng(0), shape="circle", colour="red",
                         background="white", position="center")
    return render([scene])[0]


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "PNG")
    return out.getvalue()


def test_openai_client_edits_plain_streamed_and_masked(engine, source):
    mask = np.full((32, 32, 4), 255, np.uint8)
    mask[:, 16:, 3] = 0  # transparent right half: only it may change

    async def go(client, _):
        plain = await client.images.edit(
            image=("src.png", png(source), "image/png"), prompt=PROMPT,
            extra_body={"strength": 0.8, "seed": 5, "num_inference_steps": 8})
        events = [e async for e in await client.images.edit(
            image=("src.png", png(source), "image/png"), prompt=PROMPT, stream=True,
            partial_images=2, extra_body={"seed": 5, "num_inference_steps": 8,
                                          "strength": 0.8})]
        masked = await client.images.edit(
            image=("src.png", png(source), "image/png"),
            mask=("mask.png", png(mask, "RGBA"), "image/png"), prompt=PROMPT,
            extra_body={"strength": 1.0, "seed": 6, "num_inference_steps": 6})
        return plain, events, masked

    plain, events, masked = run(make_app(engine, result_cache_mb=0), go)  # all computed
    out = decode(plain.data[0].b64_json)
    assert out.shape == (32, 32, 3) and not np.array_equal(out, source)
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_edit.completed" and "image_edit.partial_image" in kinds
    assert np.array_equal(decode(events[-1].b64_json), out)  # the same seed, same image
    edited = decode(masked.data[0].b64_json)
    assert np.array_equal(edited[:, :16], source[:, :16])  # outside the mask: exact
    assert not np.array_equal(edited[:, 16:], source[:, 16:])


def test_several_images_are_each_edited_n_times_and_the_mask_is_the_firsts(engine, source):
    other = np.ascontiguousarray(source[::-1])  # the shape at the other edge
    mask = np.full((32, 32, 4), 255, np.uint8)
    mask[:, 16:, 3] = 0
    extra = {"strength": 0.9, "seed": 11, "num_inference_steps": 6}

    async def go(client, _):
        both = await client.images.edit(
            image=[("a.png", png(source), "image/png"), ("b.png", png(other), "image/png")],
            mask=("mask.png", png(mask, "RGBA"), "image/png"), prompt=PROMPT, n=2,
            extra_body=extra)
        alone = await client.images.edit(
            image=("b.png", png(other), "image/png"), prompt=PROMPT,
            extra_body={**extra, "seed": 13})  # image 2 of 4 ran with seed 11 + 2
        return both, alone

    both, alone = run(make_app(engine, result_cache_mb=0), go)
    out = [decode(d.b64_json) for d in both.data]
    assert len(out) == 4
    for first in out[:2]:  # the first source's edits: the mask applies, outside exact
        assert np.array_equal(first[:, :16], source[:, :16])
    assert not np.array_equal(out[2][:, :16], other[:, :16])  # no mask on the second
    assert np.abs(out[2].astype(int) - decode(alone.data[0].b64_json)).max() <= 1
    assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[2], out[3])


def test_edit_jobs_are_polled_like_generations(engine, source):
    async def go(_, h):
        r = await h.post("/v1/jobs/edits", data={"prompt": PROMPT, "seed": "2",
                                                  "strength": "0.6"},
                         files={"image": ("s.png", png(source), "image/png")})
        job = r.json()
        for _ in range(200):
            view = (await h.get(f"/v1/jobs/{job['id']}")).json()
            if view["status"] == "completed":
                return r, view
            await asyncio.sleep(0.02)
        return r, view

    r, view = run(make_app(engine), go)
    assert r.status_code == 202 and view["status"] == "completed"
    assert decode(view["result"]["data"][0]["b64_json"]).shape == (32, 32, 3)


@pytest.mark.parametrize("case,param", [
    ("no image", "image"), ("too many images", "image"), ("not an image", "image"),
    ("second image not an image", "image[1]"), ("two masks", "mask"),
    ("unknown file", "extra"),
    ("too many pixels", "image"), ("mask of another size", "mask"),
    ("mask without alpha", "mask"), ("strength 0", "strength"), ("strength text", "strength"),
    ("n as text", "n"), ("unknown field", "colour"), ("json body", None)])
def test_bad_edits_get_400_naming_the_field(engine, source, case, param):
    img = ("s.png", png(source), "image/png")
    data = {"prompt": PROMPT}
    files: list = [("image", img)]
    if case == "no image":
        files = []
    elif case == "too many images":  # n x images over 10
        files, data["n"] = [("image[]", img), ("image[]", img)], "6"
    elif case == "second image not an image":
        files = [("image[]", img), ("image[]", ("t.png", b"not an image", "image/png"))]
    elif case == "two masks":
        m = ("m.png", png(np.zeros((32, 32, 4), np.uint8), "RGBA"), "image/png")
        files += [("mask", m), ("mask", m)]
    elif case == "unknown file":
        files.append(("extra", img))
    elif case == "not an image":
        files = [("image", ("s.png", b"GIF89a not really", "image/png"))]
    elif case == "too many pixels":
        files = [("image", ("s.png", png(np.zeros((64, 64, 3), np.uint8)), "image/png"))]
    elif case == "mask of another size":
        files.append(("mask", ("m.png", png(np.zeros((16, 16, 4), np.uint8), "RGBA"),
                               "image/png")))
    elif case == "mask without alpha":
        files.append(("mask", ("m.png", png(source), "image/png")))
    elif case == "strength 0":
        data["strength"] = "0"
    elif case == "strength text":
        data["strength"] = "strong"
    elif case == "n as text":
        data["n"] = "two"
    elif case == "unknown field":
        data["colour"] = "blue"

    async def go(_, h):
        if case == "json body":
            return await h.post("/v1/images/edits", json={"prompt": PROMPT})
        return await h.post("/v1/images/edits", data=data, files=files)

    r = run(make_app(engine, max_image_pixels=32 * 32 * 2), go)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_exif_orientation_is_applied_and_sources_are_fitted():
    from stepserve.server.edit_inputs import read_image

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    out = io.BytesIO()
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(out, "JPEG", exif=exif, quality=95)
    arr, original = read_image(out.getvalue(), (10, 10), 10**6)
    assert original == (20, 40)  # displayed upright: tall, not wide
    assert arr.shape == (10, 10, 3)
    assert arr[1, 5].mean() > 200 and arr[8, 5].mean() < 50  # white on top after rotation


def test_openai_client_edits_a_diffusers_folder_plain_and_streamed(tmp_path):
    pytest.importorskip("diffusers")
    from stepserve.models.families.tiny import tiny_sd

    folder = tiny_sd(tmp_path / "tiny-sd")
    app = create_app(Settings(model=str(folder), warmup_batch_sizes=[1], result_cache_mb=0))
    app.state.runtime.start(background=False)
    assert app.state.runtime.error is None, app.state.runtime.error
    src = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    async def go(client, _):
        plain = await client.images.edit(
            model="tiny-sd", image=("src.png", png(src), "image/png"), prompt="a red circle",
            extra_body={"strength": 0.6, "seed": 4, "num_inference_steps": 5})
        events = [e async for e in await client.images.edit(
            model="tiny-sd", image=("src.png", png(src), "image/png"), prompt="a red circle",
            stream=True, partial_images=1,
            extra_body={"strength": 0.6, "seed": 4, "num_inference_steps": 5})]
        return plain, events

    plain, events = run(app, go)
    out = decode(plain.data[0].b64_json)
    assert out.shape == (32, 32, 3)
    assert [e.type for e in events][-1] == "image_edit.completed"
    assert np.array_equal(decode(events[-1].b64_json), out)
