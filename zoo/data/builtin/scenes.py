"""`scenes`: one to three coloured shapes on a textured background, with everything a multimodal
or dense method needs from the same scene.

A scene has 1-3 objects, each a shape type (`SHAPES`), a named colour (`COLORS`), a size class
(small / medium / large; the objects of one scene have different size classes, so "the largest"
is never a tie) and a position. Shapes of the same size class have the same area whatever their
type. The objects are painted back to front in depth order over one of four backgrounds (noise,
stripes, checker, gradient, in random muted colours), and placements are resampled until every
object keeps at least `MIN_VISIBLE` of its pixels.

Fields:

- `image`: the RGB rendering. Every object is one flat colour, painted from the same boolean
  masks as `mask`, so the two agree pixel for pixel.
- `label`: the shape type (index into `SHAPES`) of the largest object.
- `mask`: uint8 (size, size) class map: 0 background, k + 1 for shape type k (front objects
  cover the ones behind them).
- `caption`: the exact caption, e.g. "a large red circle at the top left and a small blue square
  on the right, on a striped background".
- `meta`: `captions` {"exact", "short", "noisy", "long"} with `quality` scores in [0, 1] (exact 1.0; short
  is right but incomplete; noisy is alt-text-like: loosely right, partly wrong, or off-topic
  with quality <= 0.2, see `noisy_kind`; long is a paragraph written from the metadata, the kind of
  detailed recaption a captioning model gives: every object, which one is in front of which, how much
  of each is hidden, the background; 40-110 words, so it does not fit a 32- or 77-token text tower), `objects` (largest first: shape, color, size, position,
  bbox [x0, y0, x1, y1] of the visible pixels with exclusive ends, rgb, radius, temperature,
  depth, z = paint order), `background`, `class`.
- `thermal`: PIL "L": each object at its own temperature, a cool and nearly textureless
  background, blurred edges and a little sensor noise (colour says nothing about temperature).
- `depth`: PIL "L": the background as a ground plane receding towards the top, each object at a
  constant depth; nearer is brighter, and nearer objects are the ones painted in front.
"""

from __future__ import annotations

import colorsys
import functools
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFilter

from zoo.data.builtin._common import check_args, key, sample_rng

TAG = 2
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
NUM_CLASSES = len(SHAPES)
FIELDS = ("image", "label", "caption", "meta", "mask", "thermal", "depth")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 185, 60),
    "blue": (40, 85, 225),
    "yellow": (240, 215, 35),
    "white": (245, 245, 245),
    "purple": (150, 50, 200),
    "orange": (250, 135, 20),
}
COLOR_JITTER = 10  # per channel, per object
SIZES = {"small": (0.080, 0.100), "medium": (0.120, 0.145), "large": (0.175, 0.210)}  # radius / canvas side
BACKGROUNDS = {"noise": "noisy", "stripes": "striped", "checker": "checkered", "gradient": "gradient"}
MIN_VISIBLE = 0.6
RING_INNER = 0.55

# Shape geometry, in units of the equal-area radius r (a circle of radius r has the same area):
# the circumradius R of each outline, chosen so that area == pi r^2.
_STAR_INNER = 0.45
_CROSS_HALF_WIDTH = 0.28  # of the arm length
_R = {
    "circle": 1.0,
    "square": float(np.sqrt(np.pi) / 2 * np.sqrt(2)),  # half side sqrt(pi)/2, R = half diagonal
    "triangle": float(np.sqrt(np.pi / (3 * np.sqrt(3) / 4))),
    "star": float(np.sqrt(np.pi / (5 * _STAR_INNER * np.sin(np.pi / 5)))),
    "cross": float(np.sqrt(np.pi / (8 * _CROSS_HALF_WIDTH - 4 * _CROSS_HALF_WIDTH**2))),
    "ring": float(np.sqrt(1 / (1 - RING_INNER**2))),
}
_EXTENT = dict(_R, cross=_R["cross"] * float(np.hypot(1, _CROSS_HALF_WIDTH)))  # farthest point from the centre

OFFTOPIC = (
    "IMG_{n4} free stock photo download",
    "DSC{n5}.JPG",
    "Untitled design ({n1})",
    "click here to see more",
    "best {word} wallpapers hd 1080p",
    "photo by user{n4}",
    "screenshot {n4}-{n2}-{n2}",
    "{word} | {n2} views",
    "image may contain: text",
    "thumbnail_{n5}.png",
)
_WORDS = ("abstract", "minimal", "art", "design", "background", "pattern", "vintage", "modern")


# -- geometry ------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray | None:
    """Polygon vertices (V, 2), counter-clockwise around the centre, or None for round shapes."""
    big = _R[shape] * r
    if shape == "square":
        ang = rot + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, big)
    elif shape == "triangle":
        ang = rot + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, big)
    elif shape == "star":
        ang = rot + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, big, big * _STAR_INNER)
    elif shape == "cross":
        w = _CROSS_HALF_WIDTH * big
        pts = []
        for q in range(4):  # one arm per quarter turn: two outer corners, one inner corner
            c, s = np.cos(q * np.pi / 2), np.sin(q * np.pi / 2)
            for u, v in ((big, -w), (big, w), (w, w)):
                pts.append((c * u - s * v, s * u + c * v))
        p = np.array(pts)
        cr, sr = np.cos(rot), np.sin(rot)
        return np.stack([cx + cr * p[:, 0] - sr * p[:, 1], cy + sr * p[:, 0] + cr * p[:, 1]], 1)
    else:
        return None
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def _inside_star_polygon(verts: np.ndarray, cx: float, cy: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Point-in-polygon for a polygon star-shaped about (cx, cy) with CCW vertices (any ray from the
    centre crosses the outline once): find the edge the ray through the point hits, test its side."""
    va = np.arctan2(verts[:, 1] - cy, verts[:, 0] - cx)
    order = np.argsort(va)
    verts, va = verts[order], va[order]
    pa = np.arctan2(y - cy, x - cx)
    j = np.searchsorted(va, pa) % len(verts)  # edge from vertex j-1 to vertex j
    p0, p1 = verts[j - 1], verts[j]
    cross = (p1[..., 0] - p0[..., 0]) * (y - p0[..., 1]) - (p1[..., 1] - p0[..., 1]) * (x - p0[..., 0])
    return cross >= 0


def shape_mask(shape: str, cx: float, cy: float, r: float, rot: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape (sampled at pixel centres)."""
    out = np.zeros((size, size), bool)
    ext = _EXTENT[shape] * r
    x0, x1 = max(0, int(np.floor(cx - ext))), min(size, int(np.ceil(cx + ext)) + 1)
    y0, y1 = max(0, int(np.floor(cy - ext))), min(size, int(np.ceil(cy + ext)) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    x = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    y = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    if shape in ("circle", "ring"):
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        big = _R[shape] * r
        m = d2 <= big * big
        if shape == "ring":
            m &= d2 >= (RING_INNER * big) ** 2
    else:
        xx, yy = np.broadcast_arrays(x, y)
        m = _inside_star_polygon(_outline(shape, cx, cy, r, rot), cx, cy, xx, yy)
    out[y0:y1, x0:x1] = m
    return out


def position_word(cx: float, cy: float, size: int) -> str:
    """Where a centre lies on a 3x3 grid: "top left", "top", ..., "center", ..., "bottom right"."""
    col = ("left", "", "right")[min(2, int(3 * cx / size))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / size))]
    return f"{row} {col}".strip() or "center"


def _position_phrase(pos: str) -> str:
    return {"left": "on the left", "right": "on the right", "center": "in the center"}.get(pos, f"at the {pos}")


# -- backgrounds ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = (np.arange(size, dtype=np.float64) + 0.5) / size
    return g[None, :], g[:, None]


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A random muted colour (low saturation, dark to mid value): never mistaken for a shape colour."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.12, 0.5))) * 255


def background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (size, size, 3) background in 0..255 of a texture `kind` (a key of BACKGROUNDS)."""
    c1, c2 = _muted(rng), _muted(rng)
    x, y = _grid(size)
    ang = rng.uniform(0, np.pi)
    u = np.cos(ang) * x + np.sin(ang) * y
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-9)
    elif kind == "stripes":
        period = rng.uniform(0.1, 0.25)
        t = ((u / period + rng.random()) % 1.0 < 0.5).astype(np.float64)
    elif kind == "checker":
        cell = rng.uniform(0.1, 0.25)
        v = -np.sin(ang) * x + np.cos(ang) * y
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    elif kind == "noise":
        g = int(rng.integers(4, 9))
        low = Image.fromarray(rng.random((g, g)).astype(np.float32), "F").resize((size, size), Image.BICUBIC)
        t = np.clip(np.asarray(low, dtype=np.float64) + rng.normal(0, 0.12, (size, size)), 0, 1)
    else:
        raise ValueError(f"unknown background {kind!r}")
    t = np.broadcast_to(t, (size, size))[..., None]
    img = c1 * (1 - t) + c2 * t
    return img + rng.normal(0, 3.0, (size, size, 1))  # a little grain


# -- captions ------------------------------------------------------------------------------------
def _exact_caption(objects: list[dict[str, Any]], bg: str) -> str:
    parts = [f"a {o['size']} {o['color']} {o['shape']} {_position_phrase(o['position'])}" for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text}, on a {BACKGROUNDS[bg]} background"


_COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
_RANK_WORDS = ("The largest", "The second", "The smallest")
_BG_LONG = {"noise": "a grainy, noisy texture", "stripes": "broad parallel stripes in two muted colours",
            "checker": "a checkerboard of two muted colours", "gradient": "a smooth gradient between two muted colours"}


def _long_caption(objects: list[dict[str, Any]], bg: str, covered_by: list[list[int]], hidden: list[float]) -> str:
    """A detailed paragraph from the metadata alone (no random draws): count, every object's size, colour,
    shape and place, which objects cover which and how much, and the background."""
    n = len(objects)
    sentences = [f"This picture shows {_COUNT_WORDS[n]} on a {BACKGROUNDS[bg]} background."]
    for rank, o in enumerate(objects):
        lead = "The only one" if n == 1 else _RANK_WORDS[rank if rank < n - 1 else 2]
        text = f"{lead} is {_article(o['size'])} {o['size']} {o['color']} {o['shape']} {_position_phrase(o['position'])}"
        if covered_by[rank]:
            covers = " and ".join(f"the {objects[j]['color']} {objects[j]['shape']}" for j in covered_by[rank])
            text += f", {'partly' if hidden[rank] < 0.2 else 'largely'} hidden behind {covers}"
        elif any(rank in c for c in covered_by):
            text += ", in front of the shapes it overlaps"
        sentences.append(text + ".")
    if n > 1:
        colours = sorted({o["color"] for o in objects})
        sentences.append("The colours are " + (", ".join(colours[:-1]) + " and " + colours[-1] if len(colours) > 1
                                               else f"all {colours[0]}") + ".")
    sentences.append(f"Behind the shapes the background is {_BG_LONG[bg]}, and nothing else is in the image.")
    return " ".join(sentences)


def _noisy_caption(objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[str, float, str]:
    """(alt-text-like caption, quality, kind): "loose" (right but sloppy), "wrong" (a wrong colour or
    shape) or "offtopic" (nothing to do with the image)."""
    o = objects[0]
    u = rng.random()
    if u < 0.25:
        tpl = OFFTOPIC[int(rng.integers(len(OFFTOPIC)))]
        text = tpl.format(n1=int(rng.integers(1, 10)), n2=int(rng.integers(10, 100)), n4=int(rng.integers(1000, 10000)),
                          n5=int(rng.integers(10000, 100000)), word=_WORDS[int(rng.integers(len(_WORDS)))])
        return text, round(float(rng.uniform(0.0, 0.15)), 3), "offtopic"
    color, shape = o["color"], o["shape"]
    kind = "loose"
    if u < 0.6:
        kind = "wrong"
        if rng.random() < 0.5:
            color = [c for c in COLORS if c != color][int(rng.integers(len(COLORS) - 1))]
        else:
            shape = [s for s in SHAPES if s != shape][int(rng.integers(len(SHAPES) - 1))]
    tpl = ("{c} {s} png", "{C} {S} Vector Icon", "{c} {s} shape isolated on background", "{s} {c} {w} clipart",
           "geometric {c} {s} {w} design", "{C} {s} stock image")[int(rng.integers(6))]
    word = _WORDS[int(rng.integers(len(_WORDS)))]
    text = tpl.format(c=color, s=shape, C=color.capitalize(), S=shape.capitalize(), w=word)
    quality = rng.uniform(0.25, 0.45) if kind == "wrong" else rng.uniform(0.55, 0.75)
    return text, round(float(quality), 3), kind


# -- scenes --------------------------------------------------------------------------------------
def _layout(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """Objects (shape, colour, size class, radius, rotation, depth, temperature), largest first."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    size_names = sorted(rng.choice(list(SIZES), n, replace=False), key=list(SIZES).index, reverse=True)
    objs = []
    for sz in size_names:
        lo, hi = SIZES[sz]
        name = list(COLORS)[int(rng.integers(len(COLORS)))]
        rgb = np.clip(np.array(COLORS[name]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        objs.append({"shape": SHAPES[int(rng.integers(NUM_CLASSES))], "color": name, "size": str(sz),
                     "radius": float(rng.uniform(lo, hi) * size), "rot": float(rng.uniform(0, 2 * np.pi)),
                     "rgb": [int(v) for v in rgb], "depth": round(float(rng.uniform(0.55, 1.0)), 3),
                     "temperature": round(float(rng.uniform(0.5, 0.95)), 3)})
    return objs


def _place(objs: list[dict[str, Any]], rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """Choose centres until every object keeps MIN_VISIBLE of its pixels; returns the visible masks
    (objects that cannot be placed after many tries are dropped, smallest first)."""
    order = sorted(range(len(objs)), key=lambda j: objs[j]["depth"])  # far to near
    for attempt in range(60):
        if attempt and attempt % 20 == 0 and len(objs) > 1:  # crowded: drop the smallest object
            objs.pop()
            order = sorted(range(len(objs)), key=lambda j: objs[j]["depth"])
        full = []
        for o in objs:
            ext = _EXTENT[o["shape"]] * o["radius"]
            lo, hi = min(ext, size / 2), max(size - ext, size / 2)
            o["cx"], o["cy"] = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            full.append(shape_mask(o["shape"], o["cx"], o["cy"], o["radius"], o["rot"], size))
        visible = [m.copy() for m in full]
        for a, ja in enumerate(order):  # everything in front of ja hides it
            for jb in order[a + 1:]:
                visible[ja] &= ~full[jb]
        if all(v.sum() >= MIN_VISIBLE * max(1, f.sum()) and v.any() for v, f in zip(visible, full)):
            break
    for z, j in enumerate(order):
        objs[j]["z"] = z
    return visible


def _bbox(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def sample(i: int, *, seed: int = 0, size: int = 32, split: str = "train") -> dict[str, Any]:
    """Sample `i` of a split, from (seed, split, i) alone."""
    sid = check_args("scenes", 0, seed, size, split, i)
    return _sample(i, seed, size, sid)


def _sample(i: int, seed: int, size: int, sid: int) -> dict[str, Any]:
    rng = sample_rng(seed, TAG, sid, i)
    objs = _layout(rng, size)
    visible = _place(objs, rng, size)
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]

    img = np.clip(background(bg, rng, size) + 0.5, 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    x, y = _grid(size)
    t_bg = rng.uniform(0.12, 0.3)
    thermal = t_bg + rng.uniform(-0.05, 0.05) * (y - 0.5) + np.zeros((size, size))
    thermal += 0.02 * (np.asarray(Image.fromarray(rng.random((4, 4)).astype(np.float32), "F")
                                  .resize((size, size), Image.BICUBIC)) - 0.5)  # weak texture
    far, near = rng.uniform(0.05, 0.15), rng.uniform(0.35, 0.45)
    depth = far + (near - far) * y + np.zeros((size, size))  # ground plane: bottom rows nearest
    for o, vis in zip(objs, visible):
        img[vis] = o["rgb"]
        mask[vis] = SHAPES.index(o["shape"]) + 1
        thermal[vis] = o["temperature"]
        depth[vis] = o["depth"]

    blur = max(0.6, size / 48)
    th = Image.fromarray(np.clip(thermal * 255, 0, 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(blur))
    th_arr = np.asarray(th, dtype=np.float64) + rng.normal(0, 2.0, (size, size))  # sensor noise
    th = Image.fromarray(np.clip(th_arr + 0.5, 0, 255).astype(np.uint8), "L")
    dp = Image.fromarray(np.clip(depth * 255 + 0.5, 0, 255).astype(np.uint8), "L")

    objects = []
    for o, vis in zip(objs, visible):
        o["position"] = position_word(o["cx"], o["cy"], size)
        objects.append({"shape": o["shape"], "color": o["color"], "size": o["size"], "position": o["position"],
                        "bbox": _bbox(vis), "rgb": o["rgb"], "radius": round(o["radius"], 3),
                        "temperature": o["temperature"], "depth": o["depth"], "z": o["z"]})
    label = SHAPES.index(objects[0]["shape"])
    exact = _exact_caption(objects, bg)
    short = f"{_article(objects[0]['color'])} {objects[0]['color']} {objects[0]['shape']}"
    noisy, q_noisy, noisy_kind = _noisy_caption(objects, rng)
    q_short = {1: 0.8, 2: 0.65, 3: 0.55}[len(objects)]
    full = [shape_mask(o["shape"], o["cx"], o["cy"], o["radius"], o["rot"], size) for o in objs]
    covered_by = [[j for j in range(len(objs)) if objs[j]["z"] > objs[i]["z"] and (full[i] & full[j]).any()]
                  for i in range(len(objs))]
    hidden = [1.0 - float(v.sum()) / max(1.0, float(f.sum())) for v, f in zip(visible, full)]
    long = _long_caption(objects, bg, covered_by, hidden)
    meta = {"dataset": "scenes", "class": label, "background": bg,
            "captions": {"exact": exact, "short": short, "noisy": noisy, "long": long},
            "quality": {"exact": 1.0, "short": q_short, "noisy": q_noisy, "long": 1.0}, "noisy_kind": noisy_kind,
            "objects": objects}
    return {"__key__": key(i), "image": Image.fromarray(img, "RGB"), "label": label, "caption": exact,
            "meta": meta, "mask": mask, "thermal": th, "depth": dp}


def generate(n: int, *, seed: int = 0, size: int = 32, split: str = "train",
             start: int = 0) -> Iterator[dict[str, Any]]:
    """`n` scenes, indices `start .. start + n - 1`."""
    sid = check_args("scenes", n, seed, size, split, start)
    return (_sample(i, seed, size, sid) for i in range(start, start + n))
