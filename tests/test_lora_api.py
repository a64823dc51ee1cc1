"""The `lora` request field through the API (in-process, official openai client):
listed adapters, generations, edits and jobs with adapters, the result cache keyed by
them, reloading, and every bad value as a 4xx naming the field."""

import io

import numpy as np
import pytest
import torch
from inprocess import decode, make_app, run, wait_job
from PIL import Image
from safetensors.torch import save_file

from stepserve.models.lora.testing import random_builtin_adapter
from stepserve.server.scheduler.offline import generate_offline
from stepserve.server.scheduler.request import LoraChoice

PROMPT = "a large red circle in the center on a white background"


@pytest.fixture()
def folder(engine, tmp_path):
    random_builtin_adapter(engine.dit, tmp_path / "warm.safetensors", rank=4, seed=1,
                           std=0.05)
    (tmp_path / "cool").mkdir()
    random_builtin_adapter(engine.dit, tmp_path / "cool" / "pytorch_lora_weights.safetensors",
                           rank=8, seed=2, std=0.05)
    save_file({"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
               "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "sd-only.safetensors"))
    return tmp_path


def serve(engine, fn, **settings):
    return run(make_app(engine, **settings), fn)


def test_listing_generation_cache_key_and_jobs(engine, folder):
    async def go(client, h):
        listed = (await h.get("/v1/loras")).json()["data"]
        made = {}
        for name, lora in [("plain", None), ("warm", [{"name": "warm"}]),
                           ("cool", [{"name": "cool", "scale": 0.5}])]:
            extra = {"seed": 7, "num_inference_steps": 4, "guidance_scale": 3.0}
            if lora:
                extra["lora"] = lora
            r = await client.images.generate(prompt=PROMPT, extra_body=extra)
            made[name] = decode(r.data[0].b64_json)
        job = (await h.post("/v1/jobs", json={"prompt": PROMPT, "seed": 8,
                                              "num_inference_steps": 4,
                                              "lora": [{"name": "warm"}]})).json()
        view = await wait_job(h, job["id"])
        return listed, made, view

    listed, made, job = serve(engine, go, lora_dirs=[folder])
    by = {d["id"]: d for d in listed}
    assert by["warm"]["models"] == ["builtin"] and by["warm"]["rank"] == 4
    assert by["cool"]["rank"] == 8 and by["cool"]["bytes"] > 0
    assert by["sd-only"]["models"] == [] and "no module" in by["sd-only"]["not_for"]["builtin"]
    ref = generate_offline(engine, [PROMPT] * 2, [7, 7], 4, guidance=3.0,
                           lora=[(LoraChoice("warm"),), (LoraChoice("cool", 0.5),)])
    # same seed: the result cache must not answer an adapter request with the plain image
    assert np.abs(made["warm"].astype(int) - ref[0]).max() <= 1
    assert np.abs(made["cool"].astype(int) - ref[1]).max() <= 1
    assert np.abs(made["plain"].astype(int) - made["warm"]).max() > 16
    assert job["status"] == "completed"


def test_edits_take_lora_as_json_or_fields(engine, folder):
    src = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(src, "PNG")

    async def go(client, h):
        out = []
        for fields in ({}, {"lora": '[{"name": "warm", "scale": 1.0}]'},
                       {"lora[0][name]": "warm", "lora[0][scale]": "1"}):
            r = await h.post("/v1/images/edits", files={"image": ("s.png", src.getvalue())},
                             data={"prompt": PROMPT, "seed": "3", "strength": "0.9",
                                   **fields})
            assert r.status_code == 200, r.text
            out.append(decode(r.json()["data"][0]["b64_json"]))
        bad = await h.post("/v1/images/edits", files={"image": ("s.png", src.getvalue())},
                           data={"prompt": PROMPT, "lora": "warm"})
        return out, bad

    (plain, as_json, as_fields), bad = serve(engine, go, lora_dirs=[folder])
    assert np.array_equal(as_json, as_fields)
    assert np.abs(plain.astype(int) - as_json).max() > 16
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora"


@pytest.mark.parametrize("lora, status, param", [
    ([{"name": "nope"}], 404, "lora[0].name"),
    ([{"name": "warm"}, {"name": "sd-only"}], 400, "lora[1].name"),
    ([{"name": "warm"}, {"name": "cool"}, {"name": "warm2"}], 400, "lora"),
    ([{"name": "warm"}, {"name": "warm"}], 400, "lora"),
    ([{"name": "warm", "scale": 9}], 400, "lora.0.scale"),
    ([{"name": "warm", "rank": 2}], 400, "lora.0.rank"),
    ("warm", 400, "lora"),
])
def test_bad_lora_values_are_4xx_naming_the_field(engine, folder, lora, status, param):
    async def go(client, h):
        return await h.post("/v1/images/generations", json={"prompt": PROMPT, "lora": lora})

    r = serve(engine, go, lora_dirs=[folder], max_loras_per_request=2)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_reload_picks_up_new_and_changed_files(engine, folder):
    async def go(client, h):
        before = {d["id"]: d["digest"] for d in (await h.get("/v1/loras")).json()["data"]}
        random_builtin_adapter(engine.dit, folder / "new.safetensors", rank=2, seed=5)
        random_builtin_adapter(engine.dit, folder / "warm.safetensors", rank=4, seed=6)
        after = {d["id"]: d["digest"]
                 for d in (await h.post("/v1/loras/reload")).json()["data"]}
        r = await h.post("/v1/images/generations",
                         json={"prompt": PROMPT, "lora": [{"name": "new"}]})
        return before, after, r

    before, after, r = serve(engine, go, lora_dirs=[folder])
    assert "new" not in before and "new" in after
    assert after["warm"] != before["warm"] and after["cool"] == before["cool"]
    assert r.status_code == 200


def test_the_api_role_checks_adapters_as_workers_announce_them(engine, folder):
    """Workers publish each model's adapters (as JSON in Redis); the API role, which has
    no model, checks requests against that the same way."""
    import json

    from stepserve.models.lora.library import LoraLibrary
    from stepserve.server.errors import APIError
    from stepserve.server.loras import AnnouncedLoras, LocalLoras, choose
    from stepserve.server.protocol import LoraSpec

    local = LocalLoras(LoraLibrary([folder]), engine.lora_target)
    announced = AnnouncedLoras.from_json(json.loads(json.dumps(
        AnnouncedLoras({i.name: i for i in local.all()}).to_json())))
    for catalog in (local, announced):
        picked = choose([LoraSpec(name="warm", scale=0.5)], catalog, "builtin", 4)
        assert picked[0].name == "warm" and picked[0].scale == 0.5
        assert picked[0].digest == local.info("warm").digest
        for name, status in (("nope", 404), ("sd-only", 400)):
            with pytest.raises(APIError) as err:
                choose([LoraSpec(name=name)], catalog, "builtin", 4)
            assert err.value.status == status and err.value.param == "lora[0].name"
