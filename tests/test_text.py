import torch

from stepserve.models.builtin.text import TextBatch


def test_encoder_states_mask_pool_and_cache(encoder):
    a = encoder.encode(["a small red circle", "a large blue square in the top left corner"])
    assert a.tokens.shape[0] == 2 and a.tokens.shape[2] == 384
    assert a.mask[0].sum() < a.mask[1].sum()
    assert torch.allclose(a.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    hits = encoder.hits
    b = encoder.encode(["a large blue square in the top left corner"])
    assert encoder.hits == hits + 1
    n = int(b.mask[0].sum())
    assert torch.allclose(b.tokens[0, :n], a.tokens[1, :n])


def test_paraphrases_are_closer_than_different_content(encoder):
    e = encoder.encode(["a small red circle on a white background",
                        "a tiny red disc against a white backdrop",
                        "a large green triangle on a black background"]).pooled
    assert (e[0] @ e[1]) > (e[0] @ e[2])


def test_textbatch_cat_pads_and_selects():
    a = TextBatch(torch.ones(1, 3, 384), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 384))
    b = TextBatch(torch.ones(2, 5, 384), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 384))
    c = TextBatch.cat([a, b])
    assert c.tokens.shape == (3, 5, 384) and c.mask[0].sum() == 3 and c.mask[1:].all()
    assert c.select([2]).tokens.shape == (1, 5, 384)
