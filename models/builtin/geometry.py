"""A strict reading of a shapes image by plain geometry, with nothing learned: the
yardstick's second opinion (issue 19). The learned classifier calls ragged or blurred
shapes right more often than their geometry does; this reader does not.

- background: the palette colour nearest the image's border pixels (their median);
- the shape's mask: pixels farther from the background colour than half the distance
  to the shape's own colour (anti-aliased edges count where at least half covered),
  kept to its largest 4-connected component;
- colour: the palette colour nearest the mask's inner pixels (their median);
- size: the bounding box's longer side (small ~0.25 of the width, large ~0.45);
- position: the cell (thirds) of the bounding box's centre;
- shape: the fill ratio of the mask in its bounding box (square ~1.0, circle ~0.79,
  triangle ~0.5) and its vertical mass profile (a triangle, apex up, holds about a
  quarter of its mass in its top half; a circle or square half), checked against the
  aspect (all three fill a square box). Both are read from the coverage after a 3x3
  median, which removes single ragged edge pixels (a person still sees a square) but
  not blur (a blurred 8-pixel square is a blob to anyone), and compared with the same
  reading of the three ideal shapes drawn at the measured size and place: the nearest
  wins (at 8 pixels an ideal square's corners and a triangle's apex read differently
  from the large ones').

Anything that reads as none of them (no mask, a box far from square, a fill or profile
out of range) is marked unreadable (-1) and counts as wrong.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, PALETTE, SHAPES, SIZES, Scene, coverage

_BG = np.array([PALETTE[c] for c in BACKGROUNDS], np.float32)
_FG = np.array([PALETTE[c] for c in COLOURS], np.float32)
SIZE_SPLIT = 0.35  # bounding-box side / width between small (0.25) and large (0.45)
MAX_ASPECT = 1.35  # longer / shorter side of the box
# The kinds' readings: fill of the extent (square 1, circle pi/4, triangle 1/2) and the
# mass centre's drop below the extent's centre, in heights (a triangle, apex up: 1/6;
# circle and square: 0). Distances between readings are in units of the gaps between
# the ideal kinds (fill: square - circle; drop: triangle - circle), so both count alike.
FILL_SCALE = 1 - np.pi / 4
DROP_SCALE = 1 / 6
FILL_LIMITS = (0.3, 1.1)  # outside these no shape of the three
DROP_LIMITS = (-1 / 12, 0.3)


def _nearest(colour: np.ndarray, table: np.ndarray) -> int:
    return int(np.argmin(((table - colour) ** 2).sum(-1)))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (a small flood fill: the
    images are 32x32, and this keeps the reader free of an image library)."""
    h, w = mask.shape
    label = np.zeros((h, w), np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        label[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def read_one(image: np.ndarray) -> tuple[int, int, int, int, int]:
    """(shape, colour, background, size, position) indices of one uint8 (H, W, 3)
    image, as the contract numbers them (-1: unreadable)."""
    img = image.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_index = _nearest(np.median(border, axis=0), _BG)
    bg = _BG[bg_index]
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    far = dist > 0.5 * dist.max()
    if dist.max() < 30 or not far.any():
        return (-1, -1, bg_index, -1, -1)
    core = dist > 0.9 * dist.max()  # fully covered pixels: the shape's own colour
    fg = np.median(img[core if core.any() else far], axis=0)
    colour = _nearest(fg, _FG)
    # half-covered: at least half way from the background to the shape's colour
    mask = _largest_component(dist >= 0.5 * np.sqrt(((fg - bg) ** 2).sum()))
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return (-1, colour, bg_index, -1, -1)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    side = max(bh, bw) / w
    size = SIZES.index("large") if side > SIZE_SPLIT else SIZES.index("small")
    cy, cx = (ys.min() + ys.max() + 1) / 2 / h, (xs.min() + xs.max() + 1) / 2 / w
    position = min(2, int(cy * 3)) * 3 + min(2, int(cx * 3))
    shape = _shape(img, bg, fg, mask)
    return (shape, colour, bg_index, size, position)


def _median3(c: np.ndarray) -> np.ndarray:
    windows = sliding_window_view(np.pad(c, 1), (3, 3))
    return np.median(windows.reshape(*c.shape, 9), axis=-1)


def _reading(c: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """(fill, drop, side, centre x, centre y) of a coverage map (side and centre as
    fractions of the width), after the median; None where there is no extent."""
    c = _median3(c)
    rows, cols = c.max(axis=1), c.max(axis=0)
    height, width, area = rows.sum(), cols.sum(), c.sum()
    if min(height, width) < 1:
        return None
    y = np.arange(c.shape[0], dtype=np.float32)
    drop = ((y * c.sum(axis=1)).sum() / area - (y * rows).sum() / height) / height
    n = c.shape[0]
    cy = ((y + 0.5) * rows).sum() / height / n
    x = np.arange(c.shape[1], dtype=np.float32)
    cx = ((x + 0.5) * cols).sum() / width / c.shape[1]
    return area / (height * width), drop, max(height, width) / n, cx, cy


def _ideal_readings(side: float, cx: float, cy: float, n: int) -> list[tuple[float, float]]:
    """(fill, drop) of the three ideal kinds drawn at this size and place."""
    scenes = [Scene(k, "red", "blue", "small", "center", side, cx, cy) for k in SHAPES]
    out = []
    for cov in coverage(scenes, n):
        r = _reading(cov)
        out.append((r[0], r[1]) if r else (np.nan, np.nan))
    return out


def _shape(img: np.ndarray, bg: np.ndarray, fg: np.ndarray, mask: np.ndarray) -> int:
    """The kind from sub-pixel coverage (each pixel's share of the way from the
    background to the shape's colour), so that an 8-pixel shape still reads: its fill
    of its extent, and how far its mass centre lies below its extent's centre, against
    the same of the ideal kinds."""
    near = mask.copy()  # the component and its edge pixels
    near[1:] |= mask[:-1]
    near[:-1] |= mask[1:]
    near[:, 1:] |= mask[:, :-1]
    near[:, :-1] |= mask[:, 1:]
    d = fg - bg
    c = np.clip(((img - bg) @ d) / float(d @ d), 0, 1) * near
    rows, cols = c.max(axis=1), c.max(axis=0)
    height, width = rows.sum(), cols.sum()
    if min(height, width) < 2 or max(height, width) / min(height, width) > MAX_ASPECT:
        return -1
    reading = _reading(c)
    if reading is None:
        return -1
    fill, drop, side, cx, cy = reading
    if not (FILL_LIMITS[0] <= fill <= FILL_LIMITS[1] and DROP_LIMITS[0] <= drop <= DROP_LIMITS[1]):
        return -1
    side = min(side, 0.95)
    half = side / 2
    ideals = _ideal_readings(side, float(np.clip(cx, half, 1 - half)),
                             float(np.clip(cy, half, 1 - half)), c.shape[0])
    dist = np.array([((fill - f) / FILL_SCALE) ** 2 + ((drop - dr) / DROP_SCALE) ** 2
                     for f, dr in ideals])
    if np.isnan(dist).all():  # too small for any ideal kind to survive the median
        return -1
    return int(np.nanargmin(dist))


def read(images: np.ndarray) -> np.ndarray:
    """(N, 5) attribute indices of uint8 (N, H, W, 3) images, in ATTRIBUTES order."""
    return np.array([read_one(im) for im in images], np.int64).reshape(-1, len(ATTRIBUTES))


def accuracy(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-attribute and all-five accuracy (%) of the strict reading."""
    got = read(images)
    hit = got == labels
    out = {a: float(hit[:, i].mean() * 100) for i, a in enumerate(ATTRIBUTES)}
    out["all_five"] = float(hit.all(axis=1).mean() * 100)
    return out
