"""`fractals`: FractalDB-style classes of iterated function systems, for pretraining without any
real image (Kataoka et al. 2020; Anderson & Farrell, "Improving Fractal Pre-training", 2022).

A class is a random IFS of 2-4 contractive affine maps `x -> A x + b`. Each map is sampled as
`A = R(theta) diag(s1, s2) R(phi) diag(d, 1)` (rotations R, singular values 1 > s1 >= s2 > 0, a
reflection d = +-1), with the singular values drawn so that the system's "sigma factor"
`sum(s1 + 2 s2)` lies in a band that tends to give well-filled, non-degenerate attractors; a
system is kept only when its rendered attractor also fills enough of the canvas (FractalDB's
filling-rate filter). A sample is one rendering of its class's system after

- a small perturbation of every map's parameters (FractalDB's weight perturbation),
- a random rotation and mirror flip of the attractor,
- a random colour on a random dark, light or gradient background (Anderson & Farrell's colour and
  background augmentation).

Rendering is a vectorised chaos game: a few hundred point chains iterate in parallel, each step
applying one map per chain chosen with probability proportional to |det A|; the points (all on
the attractor: chains start at a map's fixed point) are fitted to the canvas with a margin,
splatted bilinearly into a density image, lightly blurred and tone-mapped.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image

from zoo.data.builtin._common import check_args, class_rng, coarse_labels, key, sample_rng

TAG = 1
NUM_CLASSES = 10
FIELDS = ("image", "label", "meta")

MIN_FILL = 0.20  # fraction of a 32x32 canvas the class attractor must touch
MAX_SINGULAR = 0.95
BURN_IN = 8  # chain steps before points are recorded
STEPS = 24  # recorded steps per chain
MARGIN = 0.06  # canvas fraction left empty on each side


@dataclass(frozen=True, eq=False)
class IFS:
    """An iterated function system in the parametrisation the perturbations act on (one row per map)."""

    theta: np.ndarray
    phi: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    d: np.ndarray
    b: np.ndarray  # (k, 2)

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b): the (k, 2, 2) linear parts and (k, 2) offsets."""
        ct, st, cp, sp = np.cos(self.theta), np.sin(self.theta), np.cos(self.phi), np.sin(self.phi)
        r_theta = np.stack([np.stack([ct, -st], -1), np.stack([st, ct], -1)], -2)
        r_phi = np.stack([np.stack([cp, -sp], -1), np.stack([sp, cp], -1)], -2)
        sigma = np.zeros((len(self.s1), 2, 2))
        sigma[:, 0, 0], sigma[:, 1, 1] = self.s1, self.s2
        a = r_theta @ sigma @ r_phi
        a[:, :, 0] *= self.d[:, None]  # right-multiply by diag(d, 1)
        return a, self.b

    def probs(self) -> np.ndarray:
        """Map probabilities, proportional to |det A| = s1 * s2."""
        w = self.s1 * self.s2 + 1e-3
        return w / w.sum()

    def perturbed(self, rng: np.random.Generator, strength: float = 1.0) -> "IFS":
        """The same system with every parameter nudged a little (an instance of the class)."""
        k = len(self.s1)
        s = strength
        s1 = self.s1 * (1 + s * rng.uniform(-0.05, 0.05, k))
        s2 = self.s2 * (1 + s * rng.uniform(-0.05, 0.05, k))
        s1, s2 = np.minimum(s1, MAX_SINGULAR), np.minimum(s2, MAX_SINGULAR)
        return IFS(self.theta + s * rng.normal(0, 0.04, k), self.phi + s * rng.normal(0, 0.04, k),
                   s1, np.minimum(s1, s2), self.d, self.b + s * rng.normal(0, 0.03, (k, 2)))


def random_ifs(rng: np.random.Generator) -> IFS:
    """A random contractive system of 2-4 maps whose sigma factor is in the well-filled band."""
    k = int(rng.integers(2, 5))
    target = rng.uniform(0.5 * (5 + k) - 0.5, 0.5 * (5 + k) + 0.5)  # sum over maps of s1 + 2 s2
    while True:  # split the target between the maps, then each part into s1 + 2 s2 with s2 <= s1 < 1
        parts = rng.dirichlet(np.full(k, 4.0)) * target
        if np.any(parts / 3 > MAX_SINGULAR):
            continue
        s1 = rng.uniform(parts / 3, np.minimum(parts, MAX_SINGULAR))
        s2 = (parts - s1) / 2
        if np.all(s2 <= s1) and np.all(s2 > 0.02):
            break
    return IFS(theta=rng.uniform(0, 2 * np.pi, k), phi=rng.uniform(0, 2 * np.pi, k), s1=s1, s2=s2,
               d=rng.choice([-1.0, 1.0], k), b=rng.uniform(-1, 1, (k, 2)))


def chaos_game(ifs: IFS, rng: np.random.Generator, n_points: int) -> np.ndarray:
    """About `n_points` points on the attractor, as (2, N) rows x and y: parallel chains started
    at map 0's fixed point (which is on the attractor, so even the burn-in is only for mixing)."""
    a, b = ifs.maps()
    chains = max(16, -(-n_points // STEPS))
    choice = np.searchsorted(np.cumsum(ifs.probs()), rng.random((BURN_IN + STEPS, chains)))
    np.minimum(choice, len(b) - 1, out=choice)
    coef = np.concatenate([a.reshape(-1, 4), b], 1)[choice]  # (T, chains, 6): a00 a01 a10 a11 b0 b1
    start = np.linalg.solve(np.eye(2) - a[0], b[0])  # fixed point of map 0: on the attractor
    x = np.full(chains, start[0])
    y = np.full(chains, start[1])
    out = np.empty((2, STEPS, chains))
    for t in range(BURN_IN + STEPS):
        c = coef[t]
        x, y = c[:, 0] * x + c[:, 1] * y + c[:, 4], c[:, 2] * x + c[:, 3] * y + c[:, 5]
        if t >= BURN_IN:
            out[0, t - BURN_IN], out[1, t - BURN_IN] = x, y
    return out.reshape(2, -1)


def fit_to_canvas(points: np.ndarray, size: int, margin: float = MARGIN) -> np.ndarray:
    """(2, N) points scaled (aspect kept) and centred into [margin, 1 - margin] of a `size` canvas, in pixels."""
    lo, hi = points.min(1), points.max(1)
    extent = max(float((hi - lo).max()), 1e-9)
    scale = size * (1 - 2 * margin) / extent
    return (points - ((lo + hi) / 2)[:, None]) * scale + size / 2


def splat(px: np.ndarray, size: int) -> np.ndarray:
    """Bilinear point splatting: a (size, size) density image of (2, N) pixel-space points."""
    u = px - 0.5  # pixel centres at integer + 0.5
    i0 = np.floor(u)
    f = u - i0
    i0 = i0.astype(np.int64)
    dens = np.zeros((size + 2) * (size + 2))
    idx = (i0[1] + 1) * (size + 2) + (i0[0] + 1)  # one pixel of padding all round
    fx, fy = f[0], f[1]
    for off, w in ((0, (1 - fx) * (1 - fy)), (1, fx * (1 - fy)), (size + 2, (1 - fx) * fy), (size + 3, fx * fy)):
        dens += np.bincount(idx + off, w, minlength=dens.size)
    return dens.reshape(size + 2, size + 2)[1:-1, 1:-1]


def _blur(img: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] / 4 separable blur, edges replicated."""
    p = np.pad(img, 1, mode="edge")
    h = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (h[:-2] + 2 * h[1:-1] + h[2:]) / 4


def density_to_alpha(dens: np.ndarray) -> np.ndarray:
    """Tone-map a density image to coverage in [0, 1]: thin parts visible, dense parts saturated."""
    dens = _blur(dens)
    on = dens[dens > 1e-6]
    if on.size == 0:
        return np.zeros_like(dens)
    return 1.0 - np.exp(-dens / (0.35 * float(np.median(on))))


def fill_rate(ifs: IFS, rng: np.random.Generator, size: int = 32) -> float:
    """Fraction of a `size` canvas the attractor touches (the filling-rate filter's measure)."""
    dens = splat(fit_to_canvas(chaos_game(ifs, rng, 4 * size * size), size), size)
    return float((dens > 0.05).mean())


@functools.lru_cache(maxsize=4096)
def class_ifs(seed: int, c: int) -> IFS:
    """Class `c`'s system: the first random system from the class's generator that passes the filter."""
    rng = class_rng(seed, TAG, c)
    best, best_fill = None, -1.0
    for _ in range(200):
        ifs = random_ifs(rng)
        fill = fill_rate(ifs, rng)
        if fill >= MIN_FILL:
            return ifs
        if fill > best_fill:
            best, best_fill = ifs, fill
    return best  # pragma: no cover - the filter passes within a few tries in practice


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _colours(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(background (size, size, 3), foreground (3,)) in [0, 1]: contrasted, randomly coloured."""
    dark = rng.random() < 0.5
    kind = rng.choice(["plain", "gradient"])
    v_bg = (lambda: rng.uniform(0.0, 0.25)) if dark else (lambda: rng.uniform(0.75, 1.0))
    c1 = _hsv(rng.random(), rng.uniform(0, 0.6), v_bg())
    if kind == "plain":
        bg = np.broadcast_to(c1, (size, size, 3))
    else:
        c2 = _hsv(rng.random(), rng.uniform(0, 0.6), v_bg())
        ang = rng.uniform(0, 2 * np.pi)
        g = (np.arange(size) + 0.5) / size - 0.5
        t = np.clip(0.5 + np.cos(ang) * g[None, :] + np.sin(ang) * g[:, None], 0, 1)[..., None]
        bg = c1 * (1 - t) + c2 * t
    fg = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.7, 1.0) if dark else rng.uniform(0.0, 0.35))
    return bg, fg


def render(ifs: IFS, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (size, size, 3), alpha float (size, size)) of one randomly posed, coloured instance."""
    inst = ifs.perturbed(rng)
    pts = chaos_game(inst, rng, 6 * size * size)
    ang = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    if rng.random() < 0.5:
        rot[:, 0] *= -1  # mirror
    pts = rot @ pts
    alpha = density_to_alpha(splat(fit_to_canvas(pts, size), size))
    bg, fg = _colours(rng, size)
    shade = 0.75 + 0.25 * alpha  # denser parts a little brighter / stronger
    img = bg * (1 - alpha[..., None]) + (fg * shade[..., None]) * alpha[..., None]
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), alpha


COARSE_FINE = 20  # fractals_coarse: 20 IFS classes ...
COARSE_CLASSES = 4  # ... labelled by 4 super-classes: fine class c belongs to super-class c % 4
COARSE_FIELDS = ("image", "label", "fine", "meta")


def generate_coarse(n: int, *, seed: int = 0, size: int = 32, split: str = "train",
                    start: int = 0) -> Iterator[dict[str, Any]]:
    """`fractals` with 20 classes whose `label` is a super-class (fine % 4): each super-class is 5 unrelated
    attractors, multi-modal by construction; `fine` keeps the fine class for transfer evaluation."""
    fine = generate(n, seed=seed, size=size, split=split, num_classes=COARSE_FINE, start=start)
    return coarse_labels(fine, COARSE_CLASSES, "fractals_coarse")


def sample(i: int, *, seed: int = 0, size: int = 32, split: str = "train",
           num_classes: int = NUM_CLASSES) -> dict[str, Any]:
    """Sample `i` of a split; its class and its look both come from (seed, split, i) alone."""
    sid = check_args("fractals", 0, seed, size, split, i)
    return _sample(i, seed, size, sid, _check_classes(num_classes))


def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"fractals: num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def _sample(i: int, seed: int, size: int, sid: int, num_classes: int) -> dict[str, Any]:
    rng = sample_rng(seed, TAG, sid, i)
    label = int(rng.integers(num_classes))
    rgb, _ = render(class_ifs(int(seed), label), rng, size)
    return {"__key__": key(i), "image": Image.fromarray(rgb, "RGB"), "label": label,
            "meta": {"class": label, "dataset": "fractals"}}


def generate(n: int, *, seed: int = 0, size: int = 32, split: str = "train", num_classes: int = NUM_CLASSES,
             start: int = 0) -> Iterator[dict[str, Any]]:
    """`n` samples, indices `start .. start + n - 1`; labels uniform over `num_classes` classes."""
    sid = check_args("fractals", n, seed, size, split, start)
    num_classes = _check_classes(num_classes)
    return (_sample(i, seed, size, sid, num_classes) for i in range(start, start + n))
