"""LoRA rows on the built-in model inside one batched forward: a mixed batch (several
adapters, scales, plain rows; block caches too) equals each request alone, the base
weights are never changed, and adapters are read and checked as documented."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stepserve.models.caches.config import CacheConfig
from stepserve.models.lora import apply
from stepserve.models.lora.format import LoraError, read_adapter, read_metadata
from stepserve.models.lora.library import LoraLibrary
from stepserve.models.lora.testing import random_builtin_adapter
from stepserve.server.scheduler.offline import generate_offline
from stepserve.server.scheduler.request import LoraChoice

PROMPTS = ["a red circle", "a large blue square on a white background",
           "a small green triangle in the top left", "a yellow circle at the bottom"]


@pytest.fixture(scope="module")
def lora_folder(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    random_builtin_adapter(engine.dit, folder / "warm.safetensors", rank=4, seed=1, std=0.05)
    random_builtin_adapter(engine.dit, folder / "cool.safetensors", rank=8, seed=2, std=0.05,
                           targets=("q", "kv", "out"))
    return folder


@pytest.fixture
def adapted(engine, lora_folder):
    engine.loras = LoraLibrary([lora_folder])  # the session's engine: set for each test
    return engine, lora_folder


ADAPTERS = [(), (LoraChoice("warm", 1.0),), (LoraChoice("cool", 0.7),),
            (LoraChoice("warm", 0.5), LoraChoice("cool", 1.0))]


def test_mixed_batch_equals_each_request_alone_and_adapters_change_images(adapted):
    engine, _ = adapted
    before = {k: v.clone() for k, v in engine.dit.state_dict().items()}
    together = generate_offline(engine, PROMPTS, [1, 2, 3, 4], 4, guidance=3.0,
                                lora=ADAPTERS)
    for i, adapters in enumerate(ADAPTERS):
        alone = generate_offline(engine, PROMPTS[i:i + 1], [i + 1], 4, guidance=3.0,
                                 lora=[adapters])[0]
        assert np.abs(alone.astype(int) - together[i].astype(int)).max() <= 1, i
    plain = generate_offline(engine, PROMPTS, [1, 2, 3, 4], 4, guidance=3.0)
    assert np.array_equal(plain[0], together[0])  # a plain row is untouched by its peers
    for i in (1, 2, 3):
        assert np.abs(plain[i].astype(int) - together[i].astype(int)).max() > 16, i
    for k, v in engine.dit.state_dict().items():  # nothing merged into the base
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("policy", ["first-blocks", "teacache", "ab-cache"])
def test_adapter_rows_keep_their_step_caches_in_a_mixed_batch(adapted, policy):
    engine, _ = adapted
    cache = CacheConfig.parse(policy)
    together = generate_offline(engine, PROMPTS, [5, 6, 7, 8], 8, guidance=1.0, cache=cache,
                                lora=ADAPTERS)
    for i, adapters in enumerate(ADAPTERS):
        alone = generate_offline(engine, PROMPTS[i:i + 1], [i + 5], 8, guidance=1.0,
                                 cache=cache, lora=[adapters])[0]
        assert np.abs(alone.astype(int) - together[i].astype(int)).max() <= 1, (policy, i)


def test_linear_delta_is_the_low_rank_update_per_row():
    layer = torch.nn.Linear(6, 5)
    torch.manual_seed(0)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    from stepserve.models.lora.format import LoraModule, LoraWeights

    w = LoraWeights("t", "d", {"": LoraModule(a, b)})
    hooks = apply.LoraHooks(layer)
    hooks.attach(w)
    x = torch.randn(3, 4, 6)
    with apply.rows([None, ((w, 1.0),), ((w, -0.5),)]):
        y = layer(x)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.allclose(y[0], base[0])
    assert torch.allclose(y[1], base[1] + x[1] @ a.T @ b.T, atol=1e-5)
    assert torch.allclose(y[2], base[2] - 0.5 * x[2] @ a.T @ b.T, atol=1e-5)
    assert torch.equal(layer(x), base)  # outside rows(): the base layer alone
    with pytest.raises(RuntimeError, match="do not match the batch"):
        with apply.rows([((w, 1.0),)]):
            layer(x)


# each layout the hook picks: a contiguous slice of adapted rows (uniform or mixed), a
# few scattered rows (gathered), most rows (dense with zero scales on plain rows)
@pytest.mark.parametrize("pattern", ["-AA-", "--BB", "A---B-", "AB-ABA", "CCAB", "AAAA",
                                     "AACB--"])
@pytest.mark.parametrize("part_cost", [0.0, apply.PART_COST])  # 0: a part per run of rows
def test_every_row_layout_adds_exactly_its_own_update(pattern, part_cost, monkeypatch):
    monkeypatch.setattr(apply, "PART_COST", part_cost)
    from stepserve.models.lora.format import LoraModule, LoraWeights

    layer = torch.nn.Linear(8, 16)
    torch.manual_seed(1)
    mods = {k: LoraModule(torch.randn(r, 8), torch.randn(16, r))
            for k, r in (("A", 2), ("B", 3))}
    w = {k: LoraWeights(k, k, {"": m}) for k, m in mods.items()}
    hooks = apply.LoraHooks(layer)
    for a in w.values():
        hooks.attach(a)
    choice = {"-": None, "A": ((w["A"], 1.0),), "B": ((w["B"], -0.5),),
              "C": ((w["A"], 0.5), (w["B"], 2.0))}
    x = torch.randn(len(pattern), 3, 8)
    with apply.rows([choice[c] for c in pattern]):
        y = layer(x)
    for i, c in enumerate(pattern):
        want = torch.nn.functional.linear(x[i], layer.weight, layer.bias)
        for a, scale in choice[c] or ():
            m = a.modules[""]
            want = want + scale * x[i] @ m.down.T @ m.up.T
        assert torch.allclose(y[i], want, atol=1e-5), (pattern, i)


def test_many_adapters_side_by_side_are_cut_into_parts_with_only_their_own():
    from stepserve.models.lora.format import LoraModule, LoraWeights

    ws = [LoraWeights(f"a{k}", "d", {"": LoraModule(torch.randn(8, 4), torch.randn(4, 8))})
          for k in range(8)]
    rows_ = [((ws[k // 4], 1.0),) for k in range(32)] + [None] * 8  # 8 adapters, 4 rows each
    parts = apply._layout(rows_, tuple(ws), 40)
    assert len(parts) > 1 and sum(p.span.stop - p.span.start for p in parts) == 32
    assert all(len(p.slots) < 8 for p in parts)  # not every adapter over every row
    assert apply._layout(rows_[:4] + [None] * 4, tuple(ws), 8)[0].uniform == 1.0
    scattered = apply._layout([rows_[0], None, rows_[0], None], tuple(ws), 4)
    assert len(scattered) == 1 and scattered[0].span == slice(0, 4)


def test_adapter_files_are_checked(tmp_path, engine):
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
               "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)},
              str(bad / "unet-only.safetensors"))
    save_file({"blocks.0.attn.q.lora_A.weight": torch.zeros(4, 256)},
              str(bad / "half.safetensors"))
    save_file({"blocks.0.attn.q.lora_A.weight": torch.zeros(4, 255),
               "blocks.0.attn.q.lora_B.weight": torch.zeros(256, 4)},
              str(bad / "shape.safetensors"))
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(4, 8)},
              str(bad / "text.safetensors"))
    (bad / "pickle.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    lib = LoraLibrary([bad])
    target = engine.lora_target
    for name, why in [("unet-only", "has no module"), ("half", "no lora_B"),
                      ("shape", "is 256->256"), ("text", "text encoder"),
                      ("pickle", "not a readable safetensors")]:
        with pytest.raises(LoraError, match=why):
            lib.load(name, target)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    save_file({"blocks.0.attn.q.lora_A.weight": torch.ones(4, 256),
               "blocks.0.attn.q.lora_B.weight": torch.ones(256, 4)},
              str(bad / "alpha.safetensors"), metadata=meta)
    w = read_adapter(bad / "alpha.safetensors", "alpha")
    assert float(w.modules["blocks.0.attn.q"].up[0, 0]) == 2.0  # alpha / r folded into B


def test_library_evicts_least_recently_used_within_its_budget(tmp_path, engine):
    for i in range(3):
        random_builtin_adapter(engine.dit, tmp_path / f"a{i}.safetensors", rank=8, seed=i)
    one = read_adapter(tmp_path / "a0.safetensors", "a0").nbytes
    lib = LoraLibrary([tmp_path], budget_bytes=int(2.5 * one))
    target = engine.lora_target
    first = lib.load("a0", target)
    lib.load("a1", target)
    assert lib.load("a0", target) is first  # cached
    lib.load("a2", target)  # over budget: a1 (least recently used) goes
    assert lib.loaded_bytes <= 2.5 * one
    assert lib.load("a0", target) is first
    (tmp_path / "a0.safetensors").unlink()
    random_builtin_adapter(engine.dit, tmp_path / "a0.safetensors", rank=8, seed=9)
    lib.reload()
    assert lib.load("a0", target) is not first  # a changed file is read again


def test_the_shipped_adapters_load_and_do_what_their_card_says(engine):
    """night: black background whatever the prompt says; mirror: the left-right mirror
    (the full measurement is `stepserve eval --lora`, docs/lora.md)."""
    from stepserve.server.settings import BUILTIN_LORA_DIR

    engine.loras = LoraLibrary([BUILTIN_LORA_DIR])
    assert {"night", "mirror"} <= set(engine.loras.files)
    for name in ("night", "mirror"):
        meta = json.loads(read_metadata(BUILTIN_LORA_DIR / f"{name}.safetensors")["stepserve"])
        assert meta["style"] == name
    prompts = ["a large red circle in the top left on a white background",
               "a large blue square in the top left on a yellow background"]
    plan = [(), (LoraChoice("night"),), (LoraChoice("mirror"),)]
    images = generate_offline(engine, [p for p in prompts for _ in plan],
                              [11] * len(prompts) * len(plan), 4,
                              lora=plan * len(prompts)).astype(float)
    for k in range(len(prompts)):
        plain, night, mirror = images[3 * k:3 * k + 3]
        corner = (slice(26, 31), slice(26, 31))  # bottom right: background in all three
        assert plain[corner].mean() > 150 and night[corner].max() < 60
        left, right = (slice(2, 14), slice(2, 14)), (slice(2, 14), slice(18, 30))
        # the shape moved from the top left to the top right
        assert np.abs(plain[left] - plain[corner].mean((0, 1))).mean() > 40
        assert np.abs(mirror[right] - mirror[corner].mean((0, 1))).mean() > 40
        assert np.abs(mirror[left] - mirror[corner].mean((0, 1))).mean() < 20


def test_latency_mode_requests_with_adapters_run_step_by_step(adapted):
    """ParaDiGMS rounds would drop the row's adapters: such a request is not given them."""
    from stepserve.server.scheduler.core import SchedulerConfig, SchedulerCore
    from stepserve.server.scheduler.events import Completed
    from stepserve.server.scheduler.request import GenerationParams, Request

    engine, _ = adapted
    images = {}
    for mode in ("throughput", "latency"):
        core = SchedulerCore(engine, SchedulerConfig())
        core.submit(Request(mode, GenerationParams(PROMPTS[0], 8, 3, 1.0, mode=mode,
                                                   lora=ADAPTERS[1]), 0.0))
        while core.has_work:
            for e in core.step():
                if isinstance(e, Completed):
                    images[mode] = e.images[0]
    assert np.array_equal(images["throughput"], images["latency"])
