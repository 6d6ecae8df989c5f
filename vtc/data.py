"""A procedural, seeded visual-question-answering task on synthetic scenes (issue 10).

Every sample is a 224x224 RGB picture with a textured background and 1-8 non-overlapping objects
(shapes x colours, two sizes: "large" objects of 40 px and "small" ones of 16 px, which cover only a few
14x14 or 16x16 patches), placed with their centres on a 4-pixel grid, and one question with a one-word
answer. Question kinds (the "kind" key):

    colour    "what colour is the triangle ?"      asked only when exactly one object has that shape
    shape     "what shape is the red object ?"     asked only when exactly one object has that colour
    count     "how many objects are there ?"       "one" .. "eight"
    presence  "is there a blue circle ?"            "yes" / "no" (balanced; half the "no" are near misses:
                                                     the colour and the shape are both in the scene)
    position  "where is the green square ?"        left / right / top / bottom / centre: asked only for a
                                                     unique colour+shape whose centre lies well inside the
                                                     left, right, top, bottom or centre cell of a 3x3 grid

"small" is True when the answer hinges on a small object: the object asked about is small (colour, shape,
position, presence "yes"), or, for count, the scene holds at least one small object. Benchmarks report
small-object questions apart.

Splits: sample i of seed s is drawn from `numpy.random.default_rng((s, i))`, so a (seed, index) pair
always gives the same picture and question. Training uses seeds below `HELDOUT_SEED`
(`train_seed(step)`); the held-out split is `make_scene_qa(n, HELDOUT_SEED)` (its first n samples), never
used for training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
HELDOUT_SEED = 999_999
"""Seed of the fixed held-out split. Training seeds are 0 .. HELDOUT_SEED - 1."""

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (225, 35, 35),
    "green": (35, 195, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 35),
    "purple": (155, 55, 205),
    "white": (248, 248, 248),
}
SIZES = {"small": 16, "large": 40}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
POSITIONS = ("left", "right", "top", "bottom", "centre")
KINDS = ("colour", "shape", "count", "presence", "position")
MAX_OBJECTS = 8

_GRID = 4  # object centres lie on a 4-pixel grid
_GAP = 4  # minimum gap between the bounding boxes of two objects
_CELL = IMAGE_SIZE / 3
_CELL_MARGIN = 12  # position questions need the centre this far inside its 3x3 cell
_CELL_NAMES = {(1, 0): "left", (1, 2): "right", (0, 1): "top", (2, 1): "bottom", (1, 1): "centre"}

QUESTION_WORDS = ("what", "colour", "is", "the", "shape", "object", "how", "many", "objects", "are", "there",
                  "a", "where", "?")


def vocabulary() -> list[str]:
    """Every word a question or an answer can use (no special tokens), in a fixed order."""
    words = [*QUESTION_WORDS, *SHAPES, *COLOURS, *NUMBERS[1:], "yes", "no", *POSITIONS]
    return list(dict.fromkeys(words))


def train_seed(step: int) -> int:
    """The seed of training batch `step`; never the held-out seed."""
    if not 0 <= step < HELDOUT_SEED:
        raise ValueError(f"training steps must lie in [0, {HELDOUT_SEED}); {step} would reach the held-out seed")
    return step


# --- scenes ---------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator) -> np.ndarray:
    """A muted, textured background: a tinted grey, stripes of random angle and period, pixel noise."""
    base = rng.uniform(70, 140) + rng.uniform(-18, 18, size=3)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 6.3))
    img = base[None, None, :] + rng.uniform(4, 16) * stripes[..., None]
    img = img + rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _place_objects(rng: np.random.Generator) -> list[dict]:
    """1-8 objects with random shape, colour and size, non-overlapping, centres on a 4-pixel grid."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    objects: list[dict] = []
    while len(objects) < n:
        for _ in range(100):
            size_name = "small" if rng.random() < 0.4 else "large"
            half = SIZES[size_name] // 2
            lo, hi = half + 2, IMAGE_SIZE - half - 2
            x = int(rng.integers(lo // _GRID + 1, hi // _GRID + 1)) * _GRID
            y = int(rng.integers(lo // _GRID + 1, hi // _GRID + 1)) * _GRID
            if all(
                abs(x - o["x"]) >= half + SIZES[o["size"]] // 2 + _GAP
                or abs(y - o["y"]) >= half + SIZES[o["size"]] // 2 + _GAP
                for o in objects
            ):
                break
        else:  # the picture is too crowded for this size: stop here (n only bounds the count)
            break
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        objects.append({"shape": shape, "colour": colour, "size": size_name, "x": x, "y": y})
    return objects


def _draw(draw: ImageDraw.ImageDraw, obj: dict, fill) -> None:
    half = SIZES[obj["size"]] / 2
    x, y = obj["x"], obj["y"]
    x0, y0, x1, y1 = x - half, y - half, x + half - 1, y + half - 1
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y0), (x1, y), (x, y1), (x0, y)], fill=fill)
    elif shape == "cross":
        bar = half / 3
        draw.rectangle([x - bar, y0, x + bar - 1, y1], fill=fill)
        draw.rectangle([x0, y - bar, x1, y + bar - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict], np.ndarray]:
    """Draw one scene: (RGB image, objects, mask), mask[y, x] = 1 + index of the object drawn there (0: none)."""
    image = Image.fromarray(_background(rng))
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    objects = _place_objects(rng)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for k, obj in enumerate(objects):
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj["colour"]]) + jitter, 0, 255))
        _draw(draw, obj, fill)
        _draw(draw_mask, obj, k + 1)
    return image, objects, np.asarray(mask)


# --- questions ------------------------------------------------------------------------------------------
def position_of(obj: dict) -> str | None:
    """Coarse position of an object (left/right/top/bottom/centre), None in a corner cell or near a border."""
    cell = []
    for v in (obj["y"], obj["x"]):
        c = int(v // _CELL)
        if min(v - c * _CELL, (c + 1) * _CELL - v) < _CELL_MARGIN:
            return None
        cell.append(c)
    return _CELL_NAMES.get(tuple(cell))


def ask(kind: str, objects: list[dict], rng: np.random.Generator) -> tuple[str, str, bool] | None:
    """(question, answer, small) of the given kind about these objects, or None if none is unambiguous."""
    def pick(candidates):
        return candidates[int(rng.integers(len(candidates)))] if candidates else None

    def unique(key: str) -> list[dict]:
        return [o for o in objects if sum(p[key] == o[key] for p in objects) == 1]

    if kind == "colour":
        o = pick(unique("shape"))
        return None if o is None else (f"what colour is the {o['shape']} ?", o["colour"], o["size"] == "small")
    if kind == "shape":
        o = pick(unique("colour"))
        return None if o is None else (f"what shape is the {o['colour']} object ?", o["shape"], o["size"] == "small")
    if kind == "count":
        small = any(o["size"] == "small" for o in objects)
        return "how many objects are there ?", NUMBERS[len(objects)], small
    pairs = [(o["colour"], o["shape"]) for o in objects]
    if kind == "position":
        o = pick([o for o in objects if pairs.count((o["colour"], o["shape"])) == 1 and position_of(o)])
        if o is None:
            return None
        return f"where is the {o['colour']} {o['shape']} ?", position_of(o), o["size"] == "small"
    if kind == "presence":
        if rng.random() < 0.5:
            o = pick(objects)
            small = all(p["size"] == "small" for p in objects if (p["colour"], p["shape"]) == (o["colour"], o["shape"]))
            return f"is there a {o['colour']} {o['shape']} ?", "yes", small
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
        near = [(c, s) for c, s in absent if any(p[0] == c for p in pairs) and any(p[1] == s for p in pairs)]
        colour, shape = pick(near if near and rng.random() < 0.5 else absent)
        return f"is there a {colour} {shape} ?", "no", False
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")


def make_sample(seed: int, index: int) -> dict:
    """Sample `index` of the stream `seed` (see `make_scene_qa`)."""
    rng = np.random.default_rng((seed, index))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    while True:
        image, objects, mask = render_scene(rng)
        qa = ask(kind, objects, rng)
        if qa is not None:
            question, answer, small = qa
            return {"image": image, "question": question, "answer": answer, "kind": kind, "small": small,
                    "objects": objects, "mask": mask}


def make_scene_qa(n: int, seed: int) -> list[dict]:
    """`n` seeded samples: dicts with "image" (PIL 224x224 RGB), "question", "answer" (one word), "kind"
    (one of KINDS), "small" (bool), "objects" (ground truth: shape, colour, size, centre x/y in pixels) and
    "mask" (uint8 (224, 224): 1 + object index per pixel, 0 for background).

    The same (n, seed) always gives the same samples; sample i does not depend on n. The held-out split is
    `make_scene_qa(n, HELDOUT_SEED)`."""
    return [make_sample(seed, i) for i in range(n)]
