"""Per-layer attention patterns of a ViT: NMI, mean attention distance and entropy, local / hybrid / global
bands, and the hybrid layer UNIP distils (`zoo analyze attention`).

    report = analyze_attention(as_zoo_vit(zoo.load(name)), "data/{00000..00003}.tar", n_images=64, plot="attn.png")
    report["hybrid_layer"]   # {"index": 17, "layer": 18, "nmi": ..., "in_band": True}

The metrics are pure functions of post-softmax attention maps A (B, H, N, N). Each drops the `prefix` (class)
tokens' rows and columns, adds 1e-8 and re-normalises every query row (Park et al. 2023, as in
specs/unip_tstitch.md §1.1), so a map is a distribution over the patches for each patch query:

- `nmi`: I(Q;K) / sqrt(H(Q) H(K)) with p(q) = 1/N, p(k|q) = A[q, k]: 1 when each query attends its own patch,
  0 when every query attends alike (uniform or any one fixed pattern).
- `attention_distance`: Σ_k A[q, k] ‖pos_q − pos_k‖ in pixels, averaged over queries (the ViT paper's
  mean attention distance).
- `attention_entropy`: −Σ_k A[q, k] log A[q, k] in nats, averaged over queries (log N when uniform).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.progress import progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

EPS = 1e-8  # added to every attention weight before re-normalising (the NMI reference's)
BANDS = ("local", "hybrid", "global")
FLAT_NMI_RANGE = 0.02  # below this spread of per-layer NMI (e.g. random weights) the bands say little
BAND_COLOURS = {"local": "#2ca02c", "hybrid": "#ff7f0e", "global": "#1f77b4"}
RULE = (
    "bands split the measured layers' NMI range [min, max] into thirds: the top third is local (query-dependent, "
    "diagonal attention), the bottom third global (every query attends alike), the middle third hybrid; the hybrid "
    "layer is the deepest layer in the middle third (UNIP distils MAE-L's layer 18 of 24, a late mid-NMI layer), or, "
    "if no layer falls in it, the layer whose NMI is nearest the middle third's centre (ties: the deeper). UNIP's "
    "own cut-offs are unverified; these bands are relative to this model's layers"
)


# -- metrics on attention maps -----------------------------------------------------------------------
def _patch_attention(attn: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, H, N, N) maps without the prefix tokens, + EPS, rows re-normalised; float64 for exact logs."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be (batch, heads, N, N), got {tuple(attn.shape)}")
    if not 0 <= prefix < attn.shape[-1] - 1:
        raise ValueError(f"prefix={prefix} leaves fewer than 2 of the {attn.shape[-1]} tokens")
    a = attn[..., prefix:, prefix:].double() + EPS
    return a / a.sum(-1, keepdim=True)


def _nmi_of(a: torch.Tensor) -> torch.Tensor:
    """(B, H) NMI of re-normalised patch maps `a` (B, H, N, N)."""
    n = a.shape[-1]
    p_k = a.mean(-2)  # p(k) = Σ_q p(q) A[q, k], p(q) = 1/N
    mutual = (a * (a.log() - p_k.log().unsqueeze(-2))).sum((-2, -1)) / n
    h_k = -(p_k * p_k.log()).sum(-1)
    return mutual / torch.sqrt(math.log(n) * h_k)


def _entropy_of(a: torch.Tensor) -> torch.Tensor:
    """(B, H) mean query-row entropy (nats) of re-normalised patch maps."""
    return -(a * a.log()).sum(-1).mean(-1)


def _distances(grid_hw: tuple[int, int], patch_size: int | tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N, N) pixel distances between the patch centres of an h x w grid, row-major as the tokens are."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    h, w = grid_hw
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device) * ph,
                            torch.arange(w, dtype=torch.float64, device=device) * pw, indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1)
    return torch.cdist(pos, pos)


def _distance_of(a: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """(B, H) mean attention distance of re-normalised patch maps, given the (N, N) pixel distances."""
    if dist.shape[-1] != a.shape[-1]:
        raise ValueError(f"the patch grid has {dist.shape[-1]} patches but the maps have {a.shape[-1]} patch tokens")
    return (a * dist).sum(-1).mean(-1)


def _reduce(values: torch.Tensor, per_head: bool) -> float | torch.Tensor:
    return values.mean(0) if per_head else float(values.mean())


def nmi(attn: torch.Tensor, prefix: int = 0, *, per_head: bool = False) -> float | torch.Tensor:
    """Normalised mutual information of queries and keys (Park et al. 2023), averaged over images and heads
    (or per head: (H,)); high = local, query-dependent attention, ~0 = global, the same for every query."""
    return _reduce(_nmi_of(_patch_attention(attn, prefix)), per_head)


def attention_distance(
    attn: torch.Tensor,
    grid_hw: tuple[int, int],
    patch_size: int | tuple[int, int],
    prefix: int = 0,
    *,
    per_head: bool = False,
) -> float | torch.Tensor:
    """Mean attention distance in pixels: Σ_k A[q, k]·‖pos_q − pos_k‖ averaged over queries, images and heads
    (or per head); how far a layer looks (ViT paper, Fig. 7)."""
    a = _patch_attention(attn, prefix)
    return _reduce(_distance_of(a, _distances(grid_hw, patch_size, a.device)), per_head)


def attention_entropy(attn: torch.Tensor, prefix: int = 0, *, per_head: bool = False) -> float | torch.Tensor:
    """Mean entropy (nats) of the query rows, averaged over images and heads (or per head): log N for
    uniform attention, ~0 for attention on one patch."""
    return _reduce(_entropy_of(_patch_attention(attn, prefix)), per_head)


# -- bands and the hybrid layer ------------------------------------------------------------------------
def classify_layers(nmis: Sequence[float], indices: Sequence[int] | None = None) -> dict[str, Any]:
    """The band of every layer and the hybrid layer, by `RULE`, from per-layer NMI (`indices`: their 0-based
    block indices, default 0..L-1). Returns {"bands": [...], "edges": {...}, "hybrid_layer": {...}}."""
    values = [float(v) for v in nmis]
    indices = list(range(len(values))) if indices is None else [int(i) for i in indices]
    if not values or len(indices) != len(values):
        raise ValueError(f"need one NMI per layer: got {len(values)} values for {len(indices)} layers")
    lo, hi = min(values), max(values)
    third = (hi - lo) / 3
    low_edge, high_edge = lo + third, lo + 2 * third
    bands = ["local" if v > high_edge else "global" if v < low_edge else "hybrid" for v in values]
    hybrid = [j for j, b in enumerate(bands) if b == "hybrid"]
    centre = (low_edge + high_edge) / 2
    if hybrid:
        pick = max(hybrid, key=lambda j: indices[j])
        note = "the deepest layer in the hybrid band"
    else:
        pick = min(range(len(values)), key=lambda j: (abs(values[j] - centre), -indices[j]))
        note = (f"no layer has NMI in the hybrid band ({low_edge:.4g}, {high_edge:.4g}); chose the layer whose NMI is "
                f"nearest its centre {centre:.4g}")
    return {
        "bands": bands,
        "edges": {"global": [lo, low_edge], "hybrid": [low_edge, high_edge], "local": [high_edge, hi]},
        "nmi_range": hi - lo,
        "hybrid_layer": {"index": indices[pick], "layer": indices[pick] + 1, "nmi": values[pick],
                         "in_band": bool(hybrid), "note": note},
    }


# -- running a model over shards ---------------------------------------------------------------------------
def _as_vit(model: nn.Module) -> nn.Module:
    from zoo.convert import as_zoo_vit

    return as_zoo_vit(model)


def _check_field(urls: list[str], image_field: str) -> None:
    """A ZooError naming the fields present when the first readable sample has no image field `image_field`."""
    from zoo.data.fields import IMAGE_EXTS, field_of
    from zoo.data.reader import iter_raw_samples

    raw = next(iter_raw_samples(urls, Counter()), None)
    if raw is None:
        raise ZooError(f"no readable sample in {urls[0]}{' ...' if len(urls) > 1 else ''}; "
                       "check the shards with `zoo shards check`")
    exts = {field_of(e): e for e in raw if not e.startswith("__")}
    images = sorted(f for f, e in exts.items() if f != "mask" and e.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    if image_field not in exts:
        raise ZooError(f"the samples of {urls[0]} have no field {image_field!r}: they have {sorted(exts)}; pass "
                       f"--image-field (image_field=) naming one of their image fields {images}")
    if image_field not in images:
        raise ZooError(f"field {image_field!r} of {urls[0]} is {exts[image_field]!r}, not an image; "
                       f"pass an image field among {images}")


def _display_layers(measured: list[int], hybrid: int, n: int = 4) -> list[int]:
    """About `n` measured layers spread over depth, always with the hybrid layer."""
    picks = {measured[round(j * (len(measured) - 1) / max(n - 1, 1))] for j in range(min(n, len(measured)))}
    return sorted(picks | {hybrid})


def analyze_attention(
    model: nn.Module,
    urls: str | Sequence[str],
    *,
    n_images: int = 64,
    batch_size: int = 8,
    image_field: str = "image",
    layers: Sequence[int] | None = None,
    model_name: str | None = None,
    plot: str | Path | None = None,
    n_show: int = 4,
) -> dict[str, Any]:
    """Per-layer NMI, attention distance and entropy (means and per head) of a ViT over the first `n_images`
    images of the shards, with each layer's band and the hybrid layer by `RULE`; a JSON-ready dict.

    `model`: a zoo ViT or a timm ViT (converted); it runs where its parameters are, in eval mode.
    `image_field`: the field to read, through the model's eval transform (a 1-channel field such as the
    built-in scenes' `thermal` is replicated to the model's 3 channels). `layers`: 0-based block indices
    (default all); the bands are relative to the layers measured. `plot`: also write the PNG there (NMI
    per layer with the bands, and the centre patch's attention for `n_show` images at a few layers).
    Memory: one batch holds layers x batch x heads x N^2 floats of attention.
    """
    from zoo.data import loader
    from zoo.data.shards import expand_sources
    from zoo.data.transforms import eval_transform

    for what, v in (("n_images", n_images), ("batch_size", batch_size), ("n_show", n_show)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ZooError(f"{what} must be a positive integer, got {v!r}")
    vit = _as_vit(model)
    depth = len(vit.blocks)
    measured = vit.layer_indices(layers)  # checked before any data is read
    url_list = [u for s in expand_sources(urls if isinstance(urls, str) else list(urls)) for u in s]
    _check_field(url_list, image_field)
    transform = eval_transform(vit.pretrained_cfg)

    def prepare(sample: dict[str, Any]) -> torch.Tensor:
        return transform(sample[image_field])

    data = loader(url_list, fields=(image_field,), optional_fields=(), transform=prepare,
                  batch_size=min(batch_size, n_images), shuffle=0)
    device = next((p.device for p in vit.parameters()), torch.device("cpu"))
    prefix = int(vit.num_prefix_tokens)
    patch = tuple(int(p) for p in vit.patch_embed.patch_size)
    metrics = ("nmi", "distance", "entropy")
    sums = {i: {k: torch.zeros(vit.blocks[i].attn.num_heads, dtype=torch.float64) for k in metrics} for i in measured}
    shown: list[torch.Tensor] = []  # the first n_show images, and per layer their centre patch's attention
    centre: dict[int, list[torch.Tensor]] = {i: [] for i in measured}
    n, grid, dist = 0, None, None
    was_training = vit.training
    vit.eval()
    try:
        with torch.inference_mode(), progress(total=n_images, desc="attention", unit="img") as bar:
            for x in data:
                x = x[: n_images - n].to(device)
                if grid is None:
                    grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
                    dist = _distances(grid, patch, device)
                maps = vit.attention_maps(x, layers=measured)
                for i in measured:
                    a = _patch_attention(maps[i], prefix)
                    if a.shape[-1] != grid[0] * grid[1]:
                        raise ZooError(f"layer {i}'s attention has {a.shape[-1]} non-prefix tokens, but a "
                                       f"{grid[0]}x{grid[1]} patch grid ({prefix} prefix tokens); "
                                       "is model.num_prefix_tokens right?")
                    sums[i]["nmi"] += _nmi_of(a).sum(0).cpu()
                    sums[i]["distance"] += _distance_of(a, dist).sum(0).cpu()
                    sums[i]["entropy"] += _entropy_of(a).sum(0).cpu()
                    del a
                if len(shown) < n_show:
                    k = n_show - len(shown)
                    q = prefix + (grid[0] // 2) * grid[1] + grid[1] // 2  # the centre patch's query row
                    for i in measured:
                        centre[i].append(maps[i][:k, :, q, prefix:].float().mean(1).unflatten(-1, grid).cpu())
                    shown.extend(x[:k].cpu())
                del maps
                n += len(x)
                bar.update(len(x))
                if n >= n_images:
                    break
    finally:
        vit.train(was_training)
    if n == 0:
        raise ZooError(f"no sample with an image field {image_field!r} could be read from {url_list[0]}"
                       f"{' ...' if len(url_list) > 1 else ''} (skipped: {dict(data.skipped) or 'none'}); "
                       "check the shards with `zoo shards check`")
    if data.skipped:
        log.warning("skipped %d samples: %s", sum(data.skipped.values()), dict(data.skipped))
    if n < n_images:
        log.warning("the shards hold only %d readable images with %r; analysed %d, not %d", n, image_field, n, n_images)

    per_layer = {i: {k: v / n for k, v in s.items()} for i, s in sums.items()}
    cls = classify_layers([float(per_layer[i]["nmi"].mean()) for i in measured], measured)
    rows = []
    for i, band in zip(measured, cls["bands"]):
        m = per_layer[i]
        rows.append({"index": i, "layer": i + 1, "nmi": float(m["nmi"].mean()), "distance": float(m["distance"].mean()),
                     "entropy": float(m["entropy"].mean()), "band": band,
                     **{f"{k}_per_head": [round(float(v), 6) for v in m[k]] for k in metrics}})
    data_desc = urls if isinstance(urls, str) else " ".join(map(str, urls))
    report: dict[str, Any] = {
        "model": model_name or str(getattr(model, "zoo_source", None) or type(model).__name__),
        "data": data_desc,
        "image_field": image_field,
        "n_images": n,
        "input_size": list(vit.pretrained_cfg.get("input_size", ())),
        "patch_size": list(patch),
        "grid": list(grid),
        "prefix_tokens": prefix,
        "depth": depth,
        "rule": RULE,
        "band_edges": cls["edges"],
        "nmi_range": cls["nmi_range"],
        "hybrid_layer": cls["hybrid_layer"],
        "layers": rows,
    }
    if cls["nmi_range"] < FLAT_NMI_RANGE:
        report["warning"] = (f"NMI varies by only {cls['nmi_range']:.2g} across the layers measured (random weights, "
                             "or too few layers?): the bands and the hybrid layer say little")
        log.warning("%s", report["warning"])
    if plot is not None:
        cols = _display_layers(measured, report["hybrid_layer"]["index"])
        report["plot"] = str(save_plot(report, torch.stack(shown), {i: torch.cat(centre[i]) for i in cols}, plot,
                                       mean=vit.pretrained_cfg["mean"], std=vit.pretrained_cfg["std"]))
    return report


# -- the picture -----------------------------------------------------------------------------------------
def analysis_figure(
    report: dict[str, Any],
    images: torch.Tensor,
    centre_maps: dict[int, torch.Tensor],
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> Figure:
    """Top: NMI per layer (1-based) over the shaded local / hybrid / global bands, the hybrid layer starred.
    Below: per image (rows), the image and the centre patch's attention (mean over heads, marked by a cyan
    square; dark = 0, bright = the map's maximum, so a uniform map is bright all over) at each layer in
    `centre_maps` ({0-based index: (B, h, w)})."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from zoo.engine.plots import ATTENTION_CMAP

    cols = sorted(centre_maps)
    n_rows = images.shape[0]
    n_cols = len(cols) + 1
    tile = 1.5
    fig = Figure(figsize=(max(6.4, tile * n_cols), 3.2 + tile * n_rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(2, 1, height_ratios=[3.0, tile * n_rows])
    ax = fig.add_subplot(outer[0])
    rows = report["layers"]
    xs = [r["layer"] for r in rows]
    ys = [r["nmi"] for r in rows]
    edges = report["band_edges"]
    for band in BANDS:
        lo, hi = edges[band]
        ax.axhspan(lo, hi, color=BAND_COLOURS[band], alpha=0.15, linewidth=0, label=f"{band} band")
    ax.plot(xs, ys, color="black", marker="o", markersize=4, linewidth=1.2)
    chosen = report["hybrid_layer"]
    ax.plot([chosen["layer"]], [chosen["nmi"]], marker="*", markersize=16, color="#d62728", linestyle="none",
            label=f"hybrid layer {chosen['layer']} (index {chosen['index']})")
    ax.set_xlabel("layer (1-based)")
    ax.set_ylabel("NMI")
    ax.set_title(f"{report['model']}: attention NMI per layer ({report['n_images']} images, "
                 f"field {report['image_field']})", fontsize=10)
    ax.set_xticks(xs if len(xs) <= 32 else xs[:: math.ceil(len(xs) / 32)])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")

    grid = outer[1].subgridspec(n_rows, n_cols)
    x = images.detach().float().cpu()
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (x * s + m).clamp(0, 1)[:, :3].permute(0, 2, 3, 1).numpy()
    gh, gw = report["grid"]
    ph, pw = report["patch_size"]
    bands = {r["index"]: r["band"] for r in rows}
    for b in range(n_rows):
        axes = [fig.add_subplot(grid[b, c]) for c in range(n_cols)]
        for a in axes:
            a.set_xticks([])
            a.set_yticks([])
        axes[0].imshow(pixels[b] if pixels.shape[-1] == 3 else pixels[b, ..., 0], cmap=None if pixels.shape[-1] == 3
                       else "gray", interpolation="nearest")
        for a, i in zip(axes[1:], cols):
            mp = centre_maps[i][b].numpy()
            a.imshow(mp, cmap=ATTENTION_CMAP, vmin=0.0, vmax=float(mp.max()), interpolation="nearest")
            a.add_patch(Rectangle((gw // 2 - 0.5, gh // 2 - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.2))
        if b == 0:
            axes[0].set_title("image", fontsize=9)
            for a, i in zip(axes[1:], cols):
                star = " *" if i == chosen["index"] else ""
                a.set_title(f"layer {i + 1}{star}\n{bands[i]}", fontsize=9)
        axes[0].set_ylabel(f"#{b}", fontsize=8)
    fig.supxlabel(f"attention of the centre patch (cyan, {ph}x{pw} px) over the {gh}x{gw} patches, mean over heads, "
                  "0 (dark) to its maximum (bright); * = hybrid layer", fontsize=8)
    return fig


def save_plot(
    report: dict[str, Any],
    images: torch.Tensor,
    centre_maps: dict[int, torch.Tensor],
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> Path:
    """`analysis_figure` written as a PNG."""
    from zoo.engine.plots import save

    return save(analysis_figure(report, images, centre_maps, mean=mean, std=std), path)


__all__ = ["nmi", "attention_distance", "attention_entropy", "classify_layers", "analyze_attention",
           "analysis_figure", "save_plot", "RULE"]
