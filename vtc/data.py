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
    half = (obj["px"] if "px" in obj else SIZES[obj["size"]]) / 2
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


# --- video clips (issue 22) -----------------------------------------------------------------------------
# Moving-shapes clips: VIDEO_FRAMES frames of VIDEO_SIZE x VIDEO_SIZE px on a plain noisy background, with
# objects of VIDEO_OBJECT px (shapes x colours as above), each centred in a cell of a 4 x 4 grid of 28 px cells
# (the cells of Qwen2-VL's merged visual tokens at this size). Some objects are there from frame 0 (at most one of
# them moves, 4 px a frame along a row or a column, into the next cell); others enter (appear where they stay) at
# frame 2, 4 or 6, i.e. at the start of a pair of frames, which Qwen2-VL's temporal patches (2 frames) keep apart.
# Question kinds (the "kind" key, `VIDEO_KINDS`):
#
#     moves    "which shape moves ?"                      asked when one object moves
#     appears  "what colour appears in the last frames ?" asked when exactly one object enters in the second half
#                                                         (frame 4 or 6): its colour
#     enters   "how many objects enter ?"                 objects that appear after frame 0: "zero" .. "three"
#     first    "which shape comes first ?"                asked when one object appears before all the others
#
# Sample i of seed s is drawn from `numpy.random.default_rng((s, i))` (as for scenes); the held-out split is
# `make_video_qa(n, HELDOUT_SEED)`.

VIDEO_SIZE = 112
VIDEO_FRAMES = 8
VIDEO_OBJECT = 22
VIDEO_KINDS = ("moves", "appears", "enters", "first")
ENTER_FRAMES = (2, 4, 6)
VIDEO_QUESTIONS = {
    "moves": "which shape moves ?",
    "appears": "what colour appears in the last frames ?",
    "enters": "how many objects enter ?",
    "first": "which shape comes first ?",
}
VIDEO_CELL = 28  # px: the cell of one merged visual token of Qwen2-VL (14 px patches, 2 x 2 merge)
VIDEO_GRID = VIDEO_SIZE // VIDEO_CELL
VIDEO_SPEED = VIDEO_CELL // (VIDEO_FRAMES - 1)  # px a frame: a moving object crosses one cell over the clip


def video_vocabulary() -> list[str]:
    """Every word a video question or answer can use (no special tokens), in a fixed order."""
    words = [w for q in VIDEO_QUESTIONS.values() for w in q.split()]
    return list(dict.fromkeys([*words, *SHAPES, *COLOURS, *NUMBERS[:4]]))


def object_position(obj: dict, frame: int) -> tuple[int, int]:
    """Centre (x, y) of a clip object at `frame` (moving objects go in a straight line from frame 0)."""
    return obj["x"] + obj["vx"] * frame, obj["y"] + obj["vy"] * frame


def video_layout(rng: np.random.Generator) -> list[dict]:
    """Objects of one clip, each centred in its own cell of the VIDEO_GRID x VIDEO_GRID grid: 0-3 there from frame 0
    (one of them moving with probability 0.8: VIDEO_SPEED px a frame along a row or a column, from its cell's
    centre to the next cell's at the last frame), 0-3 entering at frame 2, 4 or 6; at least one object."""
    while True:
        n_start, n_enter = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        if n_start + n_enter:
            break
    mover = int(rng.integers(n_start)) if n_start and rng.random() < 0.8 else -1
    free = [(r, c) for r in range(VIDEO_GRID) for c in range(VIDEO_GRID)]
    objects: list[dict] = []
    for k in range(n_start + n_enter):
        vx = vy = 0
        if k == mover:
            moves = [(cell, d) for cell in free for d in ((0, 1), (0, -1), (1, 0), (-1, 0))
                     if (cell[0] + d[0], cell[1] + d[1]) in free]
            (r, c), (dr, dc) = moves[int(rng.integers(len(moves)))]
            free.remove((r + dr, c + dc))
            vx, vy = dc * VIDEO_SPEED, dr * VIDEO_SPEED
        else:
            r, c = free[int(rng.integers(len(free)))]
        free.remove((r, c))
        objects.append({"shape": SHAPES[int(rng.integers(len(SHAPES)))],
                        "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                        "x": c * VIDEO_CELL + VIDEO_CELL // 2, "y": r * VIDEO_CELL + VIDEO_CELL // 2,
                        "vx": vx, "vy": vy,
                        "enter": 0 if k < n_start else int(ENTER_FRAMES[int(rng.integers(len(ENTER_FRAMES)))])})
    return objects


def ask_video(kind: str, objects: list[dict]) -> tuple[str, str] | None:
    """(question, answer) of the given kind about a clip's objects, or None when the clip does not answer it."""
    if kind == "moves":
        moving = [o for o in objects if o["vx"] or o["vy"]]
        return (VIDEO_QUESTIONS[kind], moving[0]["shape"]) if len(moving) == 1 else None
    if kind == "appears":
        late = [o for o in objects if o["enter"] >= VIDEO_FRAMES // 2]
        return (VIDEO_QUESTIONS[kind], late[0]["colour"]) if len(late) == 1 else None
    if kind == "enters":
        return VIDEO_QUESTIONS[kind], NUMBERS[sum(o["enter"] > 0 for o in objects)]
    if kind == "first":
        earliest = min(o["enter"] for o in objects)
        first = [o for o in objects if o["enter"] == earliest]
        return (VIDEO_QUESTIONS[kind], first[0]["shape"]) if len(first) == 1 else None
    raise ValueError(f"unknown video question kind {kind!r}; known: {', '.join(VIDEO_KINDS)}")


def render_clip(objects: list[dict], rng: np.random.Generator) -> tuple[list[Image.Image], np.ndarray]:
    """Draw a clip: (VIDEO_FRAMES RGB frames, masks (T, H, W) uint8: 1 + index of the object drawn there)."""
    base = rng.uniform(70, 140) + rng.uniform(-15, 15, size=3)
    background = base[None, None, :] + rng.normal(0, 6, size=(VIDEO_SIZE, VIDEO_SIZE, 3))
    fills = [tuple(int(c) for c in np.clip(np.array(COLOURS[o["colour"]]) + rng.integers(-12, 13, size=3), 0, 255))
             for o in objects]
    background = np.clip(background, 0, 255).astype(np.uint8)
    frames, masks = [], []
    for f in range(VIDEO_FRAMES):
        image = Image.fromarray(background)
        mask = Image.new("L", (VIDEO_SIZE, VIDEO_SIZE), 0)
        draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for k, obj in enumerate(objects):
            if obj["enter"] <= f:
                x, y = object_position(obj, f)
                placed = {"shape": obj["shape"], "px": VIDEO_OBJECT, "x": x, "y": y}
                _draw(draw, placed, fills[k])
                _draw(draw_mask, placed, k + 1)
        frames.append(image)
        masks.append(np.asarray(mask))
    return frames, np.stack(masks)


def make_video_sample(seed: int, index: int) -> dict:
    """Sample `index` of the video stream `seed` (see `make_video_qa`)."""
    rng = np.random.default_rng((seed, index))
    kind = VIDEO_KINDS[int(rng.integers(len(VIDEO_KINDS)))]
    while True:
        objects = video_layout(rng)
        qa = ask_video(kind, objects)
        if qa is not None:
            frames, masks = render_clip(objects, rng)
            return {"video": frames, "question": qa[0], "answer": qa[1], "kind": kind, "objects": objects,
                    "masks": masks}


def make_video_qa(n: int, seed: int) -> list[dict]:
    """`n` seeded clips with one question each: dicts with "video" (VIDEO_FRAMES PIL 112x112 RGB frames),
    "question", "answer" (one word), "kind" (one of VIDEO_KINDS), "objects" (shape, colour, centre x/y at frame 0,
    velocity vx/vy in px a frame, "enter": the first frame it is in) and "masks" (uint8 (T, 112, 112): 1 + object
    index per pixel, 0 for background). Same (n, seed), same samples; sample i does not depend on n."""
    return [make_video_sample(seed, i) for i in range(n)]
