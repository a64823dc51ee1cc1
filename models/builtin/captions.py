"""Caption phrasings for the shapes dataset.

Training captions come from a small grammar (many word orders, synonyms and
frames).  The *unseen* phrasings used by the yardstick come from templates and
synonyms that the training grammar never produces, so accuracy on them
measures whether the model follows plain English rather than memorised
wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .shapes import Scene

TRAIN_SIZE = {"small": ("small", "little"), "large": ("large", "big")}
TRAIN_BACKGROUND = {"gray": ("gray", "grey")}
TRAIN_POSITION = {
    "top left": ("top left", "top-left", "upper left"),
    "top": ("top", "top center", "top middle", "upper middle"),
    "top right": ("top right", "top-right", "upper right"),
    "left": ("left", "middle left", "left side"),
    "center": ("center", "centre", "middle"),
    "right": ("right", "middle right", "right side"),
    "bottom left": ("bottom left", "bottom-left", "lower left"),
    "bottom": ("bottom", "bottom center", "bottom middle", "lower middle"),
    "bottom right": ("bottom right", "bottom-right", "lower right"),
}
# Frames for a position phrase ({p}) and a background phrase ({b}).
TRAIN_POS_FRAMES = ("in the {p}", "at the {p}", "at the {p} of the image", "{p}")
TRAIN_BG_FRAMES = ("on a {b} background", "{b} background", "against a {b} background",
                   "with a {b} background")
# {obj} is "<size> <colour> <shape>" in some order; {pos} and {bg} are framed phrases.
TRAIN_TEMPLATES = (
    "a {obj} {pos} {bg}",
    "{obj}, {pos}, {bg}",
    "{bg}, {obj} {pos}",
    "a {colour} {shape}, {size}, {pos} {bg}",
    "{size} {colour} {shape} {pos}, {bg}",
    "a {colour} {shape} ({size}) {pos}, {bg}",
    "an image of a {obj} {pos} {bg}",
)


@dataclass(frozen=True)
class Grammar:
    """Vocabulary and templates of one training-caption grammar."""

    size: dict[str, tuple[str, ...]]
    background: dict[str, tuple[str, ...]]
    position: dict[str, tuple[str, ...]]
    pos_frames: tuple[str, ...]
    bg_frames: tuple[str, ...]
    templates: tuple[str, ...]
    colour: dict[str, tuple[str, ...]] = field(default_factory=dict)  # synonyms (v3)
    shape: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fillers: tuple[str, ...] = ()  # "{}" is the caption: "please draw {}" and the like
    noise: float = 0.0  # chance of a typo, and separately of odd casing


V1 = Grammar(TRAIN_SIZE, TRAIN_BACKGROUND, TRAIN_POSITION, TRAIN_POS_FRAMES, TRAIN_BG_FRAMES,
             TRAIN_TEMPLATES)

# v2 (the shipped checkpoint's): more structures and ways to state the background
# without the word "background", still disjoint from the unseen set. v1 was the
# first checkpoint's (17.5% all-five on unseen phrasings at 4 steps; v2: 51.5%).
V2 = Grammar(
    size={"small": ("small", "little", "smaller", "compact"),
          "large": ("large", "big", "larger", "bigger")},
    background={"gray": ("gray", "grey")},
    position={**TRAIN_POSITION,
              "top left": TRAIN_POSITION["top left"] + ("upper-left", "top left part"),
              "top right": TRAIN_POSITION["top right"] + ("upper-right", "top right part"),
              "bottom left": TRAIN_POSITION["bottom left"] + ("lower-left", "bottom left part"),
              "bottom right": TRAIN_POSITION["bottom right"] + ("lower-right",
                                                                "bottom right part"),
              "center": TRAIN_POSITION["center"] + ("centre of the image", "dead centre"),
              "left": TRAIN_POSITION["left"] + ("left-hand side", "left middle"),
              "right": TRAIN_POSITION["right"] + ("right-hand side", "right middle"),
              "top": TRAIN_POSITION["top"] + ("upper part", "top side"),
              "bottom": TRAIN_POSITION["bottom"] + ("lower part", "bottom side")},
    pos_frames=TRAIN_POS_FRAMES + ("in the {p} of the frame", "at the {p} of the frame",
                                   "in the {p} region", "at the image's {p}"),
    bg_frames=TRAIN_BG_FRAMES + ("on {b}", "against {b}", "on a {b} field",
                                 "with {b} all around it", "surrounded by {b}",
                                 "the background is {b}", "background colour {b}",
                                 "set on {b}", "{b} surroundings"),
    templates=TRAIN_TEMPLATES + (
        "there's a {obj} {pos}, {bg}",
        "an image showing a {obj} {pos}, {bg}",
        "{pos}: a {obj}, {bg}",
        "a {shape} in {colour}, {size}, {pos}, {bg}",
        "a {size} {shape} coloured {colour}, {pos}, {bg}",
        "one {obj} {pos}. {bg}",
        "{bg}. a {obj} {pos}",
        "you can see a {obj} {pos} {bg}",
        "a single {obj} {pos} {bg}",
    ),
)

# v3: synonyms for every attribute, more clause forms and word orders, filler words,
# typos and casing; still disjoint from the unseen (held-out) families. A dropped
# attribute can leave stray words or punctuation in some templates ("(, small)", "is and
# big"): kept as they are, since the shipped v3 checkpoint trained on exactly these
# captions and a reproduction must draw the same; they read as typing noise.
V3 = Grammar(
    size={"small": V2.size["small"] + ("mini", "smallish", "wee", "small-sized"),
          "large": V2.size["large"] + ("giant", "enormous", "oversized", "large-sized")},
    background={"gray": ("gray", "grey", "silver", "ash grey")},
    position={**V2.position,
              "top left": V2.position["top left"] + ("left top", "upper left part"),
              "top right": V2.position["top right"] + ("right top", "upper right part"),
              "bottom left": V2.position["bottom left"] + ("left bottom", "lower left part"),
              "bottom right": V2.position["bottom right"] + ("right bottom",
                                                             "lower right part"),
              "center": V2.position["center"] + ("middle of the image", "central part"),
              "left": V2.position["left"] + ("centre left", "left centre"),
              "right": V2.position["right"] + ("centre right", "right centre"),
              "top": V2.position["top"] + ("top centre", "upper centre"),
              "bottom": V2.position["bottom"] + ("bottom centre", "lower centre")},
    pos_frames=V2.pos_frames + ("on the {p}", "to the {p}", "in the {p} of the scene",
                                "up in the {p}", "down in the {p}", "{p} of the image"),
    bg_frames=V2.bg_frames + ("{b} bg", "on a {b} ground", "with {b} behind it",
                              "in front of {b}", "{b} everywhere else", "{b} behind",
                              "the scene around it is {b}", "on solid {b}"),
    templates=V2.templates + (
        "{obj} {pos} {bg}",
        "the {shape} is {colour} and {size}, {pos}, {bg}",
        "i see a {obj} {pos} {bg}",
        "a {obj} which is {pos}, {bg}",
        "{colour} {shape}, {size}. {pos}. {bg}.",
        "show me a {obj} {pos} {bg}",
        "generate a {obj} {pos}, {bg}",
        "{size} {shape} in {colour} {pos} {bg}",
        "a {shape} ({colour}, {size}) {pos}, {bg}",
        "render a {obj} {pos} with the background {bg_word}",
        "{bg}; {obj}; {pos}",
        "{pos} is a {obj}, {bg}",
        "a {colour} {shape} of {size} size {pos}, {bg}",
        "{bg_word} background and a {obj} {pos}",
    ),
    colour={"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald"),
            "blue": ("blue", "azure", "cobalt"), "yellow": ("yellow", "golden", "lemon"),
            "purple": ("purple", "violet", "lilac"), "orange": ("orange", "tangerine"),
            "white": ("white", "snow-white", "ivory"), "black": ("black", "jet-black",
                                                                 "ebony")},
    shape={"circle": ("circle", "disc", "disk", "dot", "round shape"),
           "square": ("square", "box", "block", "tile", "square shape"),
           "triangle": ("triangle", "triangular shape", "three-sided shape")},
    fillers=("please {}", "{}, please", "simple image: {}", "flat illustration of {}",
             "an icon: {}", "{}, nothing else", "{}, no other objects", "minimal {}",
             "{}, high quality", "hi, {}", "i would like {}", "{} thanks"),
    noise=0.15,
)
GRAMMARS = {"v1": V1, "v2": V2, "v3": V3}

UNSEEN_SIZE = {"small": ("small", "tiny"), "large": ("large", "huge")}
UNSEEN_POSITION = {
    "top left": ("upper-left corner", "top left corner"),
    "top": ("top edge", "top"),
    "top right": ("upper-right corner", "top right corner"),
    "left": ("left edge", "left"),
    "center": ("very center", "center"),
    "right": ("right edge", "right"),
    "bottom left": ("lower-left corner", "bottom left corner"),
    "bottom": ("bottom edge", "bottom"),
    "bottom right": ("lower-right corner", "bottom right corner"),
}
UNSEEN_TEMPLATES = (
    "there is a {size} {colour} {shape} located in the {pos} area, and the backdrop is {bg}",
    "{bg} canvas; one {size} {colour} {shape} placed near the {pos}",
    "picture of a {colour} {shape} that is {size}, sitting in the {pos}, over {bg}",
    "draw one {colour} {shape}, make it {size}, put it in the {pos}, fill the rest with {bg}",
    "the whole image is {bg} except for a {size} {colour} {shape} toward the {pos}",
    "{size} {shape} painted {colour}, positioned {pos}, on plain {bg}",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,;)])", r"\1", text)
    text = re.sub(r"([,;])(?=[,;])", "", text)
    text = re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", text)
    return text.strip(" ,;")


def train_caption(scene: Scene, rng: np.random.Generator, omit_prob: float = 0.0,
                  grammar: Grammar = V1) -> str:
    """One training caption; with omit_prob, drop one attribute (valid per the spec)."""
    g = grammar
    size = _pick(rng, g.size[scene.size])
    bg_word = _pick(rng, (g.background | g.colour).get(scene.background, (scene.background,)))
    pos = _pick(rng, g.pos_frames).format(p=_pick(rng, g.position[scene.position]))
    bg = _pick(rng, g.bg_frames).format(b=bg_word)
    colour = _pick(rng, g.colour.get(scene.colour, (scene.colour,)))
    shape = _pick(rng, g.shape.get(scene.shape, (scene.shape,)))
    parts = {"size": size, "colour": colour, "shape": shape, "pos": pos, "bg": bg,
             "bg_word": bg_word}
    if omit_prob and rng.random() < omit_prob:
        dropped = _pick(rng, ("size", "colour", "pos", "bg"))
        parts[dropped] = ""
        if dropped == "bg":
            parts["bg_word"] = ""
    words = [parts["size"], parts["colour"]]
    if rng.random() < 0.3:
        words.reverse()
    obj = " ".join([*words, parts["shape"]])
    text = _pick(rng, g.templates).format(obj=obj, **parts)
    text = _tidy(text.replace("( ) ", "").replace("()", "").replace("(, )", "")
                 .replace(" of  size", ""))
    if g.fillers and rng.random() < 0.3:
        text = _pick(rng, g.fillers).format(text)
    return _noisy(text, rng, g.noise) if g.noise else text


def _noisy(text: str, rng: np.random.Generator, p: float) -> str:
    """A typo in one word (a letter dropped, doubled or swapped) with chance p, and odd
    casing with chance p: what people type."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if long and rng.random() < p:
        i = long[rng.integers(len(long))]
        w, k = words[i], int(rng.integers(1, len(words[i]) - 1))
        kind = rng.integers(3)
        words[i] = (w[:k] + w[k + 1:] if kind == 0 else w[:k] + w[k] + w[k:] if kind == 1
                    else w[:k - 1] + w[k] + w[k - 1] + w[k + 1:])
    text = " ".join(words)
    if rng.random() < p:
        text = (text.upper(), text.capitalize(), text.title())[rng.integers(3)]
    return text


def unseen_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption in wording the training grammar never produces."""
    size = _pick(rng, UNSEEN_SIZE[scene.size])
    pos = _pick(rng, UNSEEN_POSITION[scene.position])
    template = _pick(rng, UNSEEN_TEMPLATES)
    return _tidy(template.format(size=size, colour=scene.colour, shape=scene.shape,
                                 pos=pos, bg=scene.background))


def canonical_caption(scene: Scene, omit: str | None = None) -> str:
    """The spec's first example phrasing; used as the default prompt form. `omit` leaves
    out one attribute (size, colour, position or background): the model picks it."""
    words = {"size": scene.size, "colour": scene.colour,
             "position": f"in the {scene.position}",
             "background": f"on a {scene.background} background"}
    if omit is not None:
        words[omit] = ""
    return _tidy(f"a {words['size']} {words['colour']} {scene.shape} {words['position']} "
                 f"{words['background']}")


def vocabulary() -> tuple[str, ...]:
    """The words that name an attribute the built-in model knows (shapes, colours,
    sizes, positions, backgrounds and the synonyms of every phrasing it was trained or
    measured on); a prompt with none of them is outside what it can draw."""
    from .shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

    phrases: list[str] = [*SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *POSITIONS]
    for table in (*(g.size for g in GRAMMARS.values()),
                  *(g.background for g in GRAMMARS.values()),
                  *(g.colour for g in GRAMMARS.values()),
                  *(g.shape for g in GRAMMARS.values()),
                  *(g.position for g in GRAMMARS.values()), UNSEEN_SIZE, UNSEEN_POSITION):
        for options in table.values():
            phrases += options
    words = {w for p in phrases for w in re.findall(r"[a-z]+", p.lower())}
    return tuple(sorted(words - GENERIC))


# words of position phrases ("dead center", "right-hand side", "top of the image") that
# name nothing by themselves
GENERIC = frozenset({"of", "the", "image", "part", "hand", "dead", "very", "edge", "side",
                     "corner", "shape", "round", "sided", "three", "snow", "jet", "ash",
                     "sized", "central"})
