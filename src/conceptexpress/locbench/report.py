"""Pictures and tables of the localization benchmark: paper Table 3 as markdown, paper Fig. 7 as a PNG grid.

Pure functions of the scores / masks (no model): ``format_table`` reads the ``summary`` of ``results.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from conceptexpress.viz import overlay_concepts

__all__ = ["bench_figure", "format_table", "method_names"]

_PANEL_HEIGHT = 192

_TITLE_HEIGHT = 22
_GAP = 4


def method_names(ks: tuple[int, ...], maskcut: bool = False) -> list[str]:
    """Column order of Table 3: ``kmeans@k`` for every k, ``finch@k`` for every k, ``ours``, then ``maskcut``
    (the reference column "MC") when asked for."""
    return [f"kmeans@{k}" for k in ks] + [f"finch@{k}" for k in ks] + ["ours"] + (["maskcut"] if maskcut else [])


def format_table(
    summary: dict[str, dict[str, Any]],
    ks: tuple[int, ...],
    iou_threshold: float = 0.5,
    maskcut_clust: str | None = None,
) -> str:
    """Markdown table shaped like paper Table 3: IoU, Recall, Precision (micro, %) per method column.

    In every row the best value (after rounding to one decimal) is **bold** and the second best <u>underlined</u>;
    ties share the mark. With ``maskcut_clust`` (its "#clust" cell, e.g. "≤3" or "given") the MaskCut column
    "MC" is appended after Ours; like the paper's, it is a reference column and takes no mark.
    """
    maskcut = maskcut_clust is not None
    methods = method_names(ks)  # the ranked columns
    pad = [""] * (len(ks) - 1)
    lines = [
        "| Method | " + " | ".join(["k-means", *pad, "FINCH", *pad, "Ours"] + (["MC"] if maskcut else [])) + " |",
        "|---|" + "---:|" * (len(methods) + maskcut),
        "| #clust | "
        + " | ".join([*(str(k) for k in ks), *(str(k) for k in ks), "auto"] + ([maskcut_clust] if maskcut else []))
        + " |",
    ]
    for label, key in (("IoU", "iou"), ("Recall", "recall"), ("Precision", "precision")):
        values = [round(100.0 * summary[m][key], 1) for m in methods]
        ranked = sorted(set(values), reverse=True)
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        cells = [
            f"**{v:.1f}**" if v == best else f"<u>{v:.1f}</u>" if v == second else f"{v:.1f}" for v in values
        ]
        if maskcut:
            cells.append(f"{100.0 * summary['maskcut'][key]:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ours = summary["ours"]
    lines += [
        "",
        f"{ours['num_images']} images, {ours['num_gt']} objects. IoU: mean over ground-truth objects of the IoU with "
        f"the Hungarian-matched mask (missed objects count 0). Recall / Precision: matched pairs with IoU >= "
        f"{iou_threshold:g} over objects / over predicted masks. Micro averages over the dataset, in %. "
        f"Ours found {ours['mean_num_pred']:.2f} concepts per image on average. "
        + (
            f"MC: MaskCut (CutLER) on DINO features, {summary['maskcut']['mean_num_pred']:.2f} masks per image on "
            "average, a reference column without marks. "
            if maskcut
            else ""
        )
        + "Best **bold**, second <u>underlined</u>.",
        "",
    ]
    return "\n".join(lines)


def bench_figure(rows: list[tuple[Image.Image, np.ndarray, dict[str, np.ndarray]]], k: int) -> Image.Image:
    """Paper Fig. 7: one row per image; columns source | k-means@k | FINCH@k | ours | ground truth.

    ``rows`` holds (RGB image, gt (G, H, W) bool, {"kmeans@k", "finch@k", "ours": (M, H, W) bool}); every
    located concept is a distinct coloured, numbered region (``overlay_concepts``).
    """
    titles = ["source", f"k-means ({k})", f"FINCH ({k})", "ours (auto)", "ground truth"]
    grid: list[list[Image.Image]] = []
    for image, gt, masks in rows:
        cells = [image] + [overlay_concepts(image, masks[m]) for m in (f"kmeans@{k}", f"finch@{k}", "ours")]
        cells.append(overlay_concepts(image, gt))
        w, h = image.size
        size = (max(1, round(_PANEL_HEIGHT * w / h)), _PANEL_HEIGHT)
        grid.append([c.resize(size, Image.Resampling.BICUBIC) for c in cells])
    col_w = [max(row[c].width for row in grid) for c in range(len(titles))]
    width = sum(col_w) + _GAP * (len(titles) + 1)
    height = _TITLE_HEIGHT + len(grid) * (_PANEL_HEIGHT + _GAP) + _GAP
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    x = _GAP
    for c, title in enumerate(titles):
        draw.text((x + 2, 5), title, fill=(0, 0, 0))
        y = _TITLE_HEIGHT
        for row in grid:
            fig.paste(row[c], (x, y))
            y += _PANEL_HEIGHT + _GAP
        x += col_w[c] + _GAP
    return fig
