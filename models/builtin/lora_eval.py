"""Quality of the built-in model's adapters, read by the yardstick (`stepserve bench
lora`, `stepserve eval --lora`).

Every prompt runs in one mixed batch: the same prompts with `night`, with `mirror`
and without an adapter, so the plain rows are measured next to adapter rows.
- night: on prompts whose shape and background are not black (else nothing to
  change), the background read as black, and the shape's colour as prompted;
- mirror: the shape read in the mirrored cell (top left -> top right), the other
  four attributes as prompted;
- plain rows: all-five as prompted, against the same prompts in a batch with no
  adapters at all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .lora_train import MIRRORED
from .shapes import ATTRIBUTES, BACKGROUNDS, POSITIONS
from .yardstick import Yardstick, prompt_set

# generate(prompts, seeds, steps, guidance=..., lora=[...]) -> uint8 images (N, H, W, 3)
GenerateLora = Callable[..., np.ndarray]

BG, POS, COLOUR = (ATTRIBUTES.index(a) for a in ("background", "position", "colour"))


def lora_rows(generate: GenerateLora, stick: Yardstick, n: int, steps_list: list[int],
              choose: Callable[[str, float], object], guidance: float | None = None
              ) -> list[dict]:
    """`choose(name, scale)` makes one request's adapter choice (the caller's type)."""
    ps = prompt_set("seen", n)
    labels = ps.labels
    seeds = list(ps.seeds)
    prompts = list(ps.prompts)
    rows = []
    for steps in steps_list:
        plan = [()] * n + [(choose("night", 1.0),)] * n + [(choose("mirror", 1.0),)] * n
        images = generate(prompts * 3, seeds * 3, steps, guidance=guidance, lora=plan)
        alone = generate(prompts, seeds, steps, guidance=guidance)
        plain, night, mirror = (stick.read(images[k * n:(k + 1) * n])[0] for k in range(3))
        base = stick.read(alone)[0]
        changeable = (labels[:, COLOUR] != labels[:, BG]) & (
            labels[:, BG] != BACKGROUNDS.index("black")) & (
            labels[:, COLOUR] != BACKGROUNDS.index("black"))
        mirrored = np.array([POSITIONS.index(MIRRORED[POSITIONS[p]]) for p in labels[:, POS]])
        others = [i for i in range(len(ATTRIBUTES)) if i != POS]
        rows.append({
            "steps": steps,
            "night_black_bg": 100 * float((night[changeable, BG]
                                           == BACKGROUNDS.index("black")).mean()),
            "night_colour_kept": 100 * float((night[changeable, COLOUR]
                                              == labels[changeable, COLOUR]).mean()),
            "mirror_cell": 100 * float((mirror[:, POS] == mirrored).mean()),
            "mirror_rest_kept": 100 * float((mirror[:, others] == labels[:, others])
                                            .all(1).mean()),
            "plain_all_five": 100 * float((plain == labels).all(1).mean()),
            "no_adapters_all_five": 100 * float((base == labels).all(1).mean()),
            "plain_identical": 100 * float((images[:n] == alone).all(axis=(1, 2, 3)).mean()),
        })
    return rows
