import re

import numpy as np
import pytest

from stepserve.models.builtin.captions import (
    GRAMMARS,
    TRAIN_BACKGROUND,
    TRAIN_POSITION,
    TRAIN_SIZE,
    UNSEEN_TEMPLATES,
    train_caption,
    unseen_caption,
)
from stepserve.models.builtin.shapes import sample_scene

HELD_OUT_WORDS = ("tiny", "huge", "backdrop", "canvas", "corner", "located", "placed",
                  "positioned", "edge", "painted", "picture", "draw", "whole", "sitting",
                  "toward", "fill", "except", "plain", "area", "near", "over")


def _mentions(caption: str, scene) -> bool:
    c = caption.lower()
    return scene.shape in c and scene.colour in c


def test_train_captions_state_attributes_and_vary():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(500):
        s = sample_scene(rng)
        c = train_caption(s, rng)
        assert _mentions(c, s)
        bg = "grey" if s.background == "gray" and "grey" in c else s.background
        assert bg in c
        seen.add(c.replace(s.shape, "X"))
    assert len(seen) > 300, "phrasings should vary"


@pytest.mark.parametrize("grammar", sorted(GRAMMARS))
def test_unseen_phrasings_never_come_from_training_grammar(grammar):
    rng = np.random.default_rng(1)
    train_words = set()
    for _ in range(5000):
        caption = train_caption(sample_scene(rng), rng, 0.2, GRAMMARS[grammar])
        train_words |= set(re.findall(r"[a-z]+", caption))
    for word in HELD_OUT_WORDS:
        assert word not in train_words
    unseen_words = set()
    for _ in range(500):
        s = sample_scene(rng)
        c = unseen_caption(s, rng)
        assert _mentions(c, s) and s.background in c
        unseen_words |= set(re.findall(r"[a-z]+", c))
    assert {"tiny", "huge", "backdrop", "corner"} <= unseen_words
    assert not set(UNSEEN_TEMPLATES) & set(GRAMMARS[grammar].templates)


def test_omission_drops_exactly_one_attribute_phrase():
    rng = np.random.default_rng(2)
    dropped = {"size": 0, "colour": 0, "background": 0, "position": 0}
    for _ in range(400):
        s = sample_scene(rng)
        words = train_caption(s, rng, omit_prob=1.0).replace("-", " ").replace(",", " ").split()
        text = " ".join(words)
        present = {
            "size": any(w in words for w in TRAIN_SIZE[s.size]),
            "colour": s.colour in words,
            "background": any(b in words for b in TRAIN_BACKGROUND.get(s.background,
                                                                      (s.background,))),
            "position": any(p.replace("-", " ") in text for p in TRAIN_POSITION[s.position]),
        }
        assert not all(present.values()), text
        for k, v in present.items():
            dropped[k] += not v
    assert all(n > 40 for n in dropped.values()), dropped
