"""Editing a localization before training: merge, drop, split, add (pure functions on ``Localization``).

Each edit returns a *new* :class:`conceptexpress.localize.result.Localization` whose parts agree with each other:

- latent masks (N, h, w) disjoint, concepts numbered in raster order of their first pixel (the order
  ``cluster_concepts`` uses, so a merged concept takes the lower of its numbers and later ones move up);
- ``post_labels`` rebuilt from the masks, ``masks`` at the source size re-upsampled from them;
- centroids f_i by the localization's own rule (``clusters.clustering``):

  * ``"paper"``: Eq. 6, f_i = m_i·A / |m_i|, the mean attention row over the mask;
  * ``"released"``: the unweighted mean, over the pre-clusters p the mask covers, of the mean attention row of
    the mask's pixels in p — the released code's rule (merged concepts are unweighted means of their
    pre-clusters' mean rows), which gives back the localization's own centroids for unedited concepts.

Merge and drop need no attention matrix: a merged centroid is the mean of the parts' centroids weighted by
pixel count ("paper", exactly Eq. 6) or by pre-cluster count ("released", exact when the parts cover disjoint
sets of whole pre-clusters, as localization leaves them). Split and add read rows of the aggregated
self-attention A (h·w, h·w) — ``ConceptLocalizer.attention(image).attn`` — and recompute every centroid they
touch exactly. Indices are 0-based here; the overlay, the CLI and the UI number concepts from 1.

Nothing here imports diffusers: the functions are tested on synthetic tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..errors import ConceptExpressError
from ..io.images import upsample_masks
from .cluster import _first_appearance_order
from .finch import finch, single_torch_thread
from .kl import pairwise_symmetric_kl

if TYPE_CHECKING:
    from .result import Localization  # the result module imports this one: its merge and drop are these

__all__ = [
    "EditError",
    "add_concept",
    "concept_centroid",
    "drop_concepts",
    "latent_mask",
    "merge_concepts",
    "split_concept",
]


class EditError(ConceptExpressError):
    """An edit that cannot apply to this localization (unknown concept number, empty mask, …)."""

    exit_code = 2


# ----------------------------------------------------------------------------- centroids
def concept_centroid(mask: Tensor, attn: Tensor, pre_labels: Tensor, clustering: str) -> Tensor:
    """Centroid f of one concept from the aggregated self-attention (see the module docstring for the rules).

    Args:
        mask: (h, w) or (h·w,) bool, non-empty.
        attn: (h·w, h·w) float row-stochastic aggregated self-attention A (paper §3.2).
        pre_labels: (h, w) int64 pre-cluster of every latent pixel.
        clustering: ``"paper"`` (Eq. 6) or ``"released"``.

    Returns:
        (h·w,) float32 on the CPU.
    """
    m = mask.reshape(-1).bool().cpu()
    if not bool(m.any()):
        raise EditError("a concept mask is empty after the edit")
    rows = attn.detach().cpu().float()
    if clustering == "paper":
        return rows[m].mean(0)  # Eq. 6
    pre = pre_labels.reshape(-1).cpu()
    parts = [rows[m & (pre == p)].mean(0) for p in torch.unique(pre[m]).tolist()]
    return torch.stack(parts).mean(0)


def _check_attn(loc: Localization, attn: Tensor | None, edit: str) -> Tensor:
    h, w = loc.latent_hw
    if attn is None:
        raise EditError(
            f"{edit} needs the image's self-attention A ((h·w, h·w) = ({h * w}, {h * w})) to compute centroids; "
            "get it from ConceptLocalizer(pipe, config).attention(image).attn"
        )
    if tuple(attn.shape) != (h * w, h * w):
        raise EditError(f"`attn` must be ({h * w}, {h * w}) for a {h}x{w} latent, got {tuple(attn.shape)}")
    return attn


def _check_indices(loc: Localization, indices: Sequence[int], edit: str) -> list[int]:
    n = loc.num_concepts
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < n:
            raise EditError(f"{edit}: concept {i!r} does not exist (0-based; this localization has {n} concepts)")
        out.append(int(i))
    if len(set(out)) != len(out):
        raise EditError(f"{edit}: concept numbers repeat in {list(indices)}")
    return out


# ----------------------------------------------------------------------------- assembling a result
def _rebuild(loc: Localization, masks: Tensor, centroids: Tensor, note: str) -> Localization:
    """New Localization from edited latent masks (K, h, w) bool and centroids (K, h·w): renumber in raster order,
    rebuild post_labels and the source-size masks."""

    h, w = loc.latent_hw
    k = int(masks.shape[0])
    label = torch.full((h * w,), -1, dtype=torch.long)
    flat = masks.reshape(k, -1)
    assert not bool((flat.sum(0) > 1).any()), "edited masks overlap"
    for i in range(k):
        label[flat[i]] = i
    order = _first_appearance_order(label, k)  # (K,) old index of concept 0, 1, …
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    post = torch.where(label >= 0, rank[label.clamp(min=0)], -1).reshape(h, w)
    new_masks = masks[order].clone()
    clusters = replace(
        loc.clusters,
        masks=new_masks,
        centroids=centroids[order].float().contiguous(),
        post_labels=post,
        messages=(*loc.clusters.messages, note),
    )
    return replace(loc, clusters=clusters, masks=upsample_masks(new_masks.numpy(), loc.source_size))


# ----------------------------------------------------------------------------- edits
def merge_concepts(loc: Localization, indices: Sequence[int], *, attn: Tensor | None = None) -> Localization:
    """Merge two or more concepts into one (their masks' union).

    The centroid is recomputed from ``attn`` when given, else combined from the parts' centroids (exact for
    ``"paper"``; see the module docstring for ``"released"``).
    """
    idx = _check_indices(loc, indices, "merge")
    if len(idx) < 2:
        raise EditError(f"merge needs at least two concepts, got {list(indices)}")
    c = loc.clusters
    union = c.masks[idx].any(0)  # (h, w)
    if attn is not None:
        centroid = concept_centroid(union, _check_attn(loc, attn, "merge"), c.pre_labels, c.clustering)
    else:
        if c.clustering == "paper":
            weights = c.masks[idx].reshape(len(idx), -1).sum(1).float()  # pixel counts: Eq. 6 of the union
        else:
            pre = c.pre_labels.reshape(-1)
            weights = torch.tensor(
                [float(len(torch.unique(pre[c.masks[i].reshape(-1)]))) for i in idx]
            )  # pre-clusters per part: the unweighted mean over all of them
        centroid = (weights[:, None] * c.centroids[idx]).sum(0) / weights.sum()
    keep = [i for i in range(loc.num_concepts) if i not in idx]
    masks = torch.cat([c.masks[keep], union[None]])
    centroids = torch.cat([c.centroids[keep], centroid[None].float()])
    return _rebuild(loc, masks, centroids, f"edit: merged concepts {', '.join(str(i + 1) for i in idx)}")


def drop_concepts(loc: Localization, indices: Sequence[int]) -> Localization:
    """Remove concepts (their pixels become background); the others keep their masks and centroids."""
    idx = _check_indices(loc, indices, "drop")
    if not idx:
        return loc
    keep = [i for i in range(loc.num_concepts) if i not in idx]
    c = loc.clusters
    return _rebuild(loc, c.masks[keep], c.centroids[keep], f"edit: dropped concepts {', '.join(str(i + 1) for i in idx)}")


def split_concept(loc: Localization, index: int, attn: Tensor, *, eps: float = 1e-12) -> Localization:
    """Split a concept by re-clustering its region one level finer.

    FINCH (paper Eq. 2, symmetric KL of Eq. 3–4) runs on the attention rows of the concept's pixels; the
    coarsest level with at least two clusters gives the new concepts (the concept itself is the level above,
    one cluster). Raises ``EditError`` when the region does not split (one pixel, or FINCH joins it at once).
    """
    (i,) = _check_indices(loc, [index], "split")
    attn = _check_attn(loc, attn, "split")
    c = loc.clusters
    flat = c.masks[i].reshape(-1)
    pixels = torch.nonzero(flat).reshape(-1)  # (P,)
    if len(pixels) < 2:
        raise EditError(f"split: concept {i + 1} covers {len(pixels)} latent pixel; nothing to split")
    rows = attn.detach().cpu().float()[pixels]  # (P, h·w)
    stop = "original" if c.clustering == "released" else "design"
    with single_torch_thread(torch.device("cpu")):
        levels = finch(rows, lambda r: pairwise_symmetric_kl(r, eps), stop=stop)
    finer = [lv for lv in levels if lv.num_clusters >= 2]
    if not finer:
        raise EditError(f"split: the attention of concept {i + 1} forms a single cluster; nothing to split")
    level = finer[-1]
    h, w = loc.latent_hw
    pieces = []
    for p in range(level.num_clusters):
        m = torch.zeros(h * w, dtype=torch.bool)
        m[pixels[level.labels.cpu() == p]] = True
        pieces.append(m.reshape(h, w))
    piece_masks = torch.stack(pieces)  # (k, h, w)
    piece_centroids = torch.stack([concept_centroid(m, attn, c.pre_labels, c.clustering) for m in pieces])
    keep = [j for j in range(loc.num_concepts) if j != i]
    masks = torch.cat([c.masks[keep], piece_masks])
    centroids = torch.cat([c.centroids[keep], piece_centroids])
    return _rebuild(loc, masks, centroids, f"edit: split concept {i + 1} into {level.num_clusters}")


def latent_mask(mask: np.ndarray | Tensor, loc: Localization, threshold: float = 0.5) -> Tensor:
    """A user's mask at the source size (H, W) — or already at latent size (h, w) — as an (h, w) bool latent mask.

    Source-size masks are area-averaged onto the latent grid; a latent pixel belongs to the mask when more than
    ``threshold`` of its area is covered. Any dtype: non-zero is inside.
    """
    m = torch.as_tensor(np.asarray(mask)).bool()
    if m.ndim == 3:  # (H, W, C) image: any channel
        m = m.any(-1)
    h, w = loc.latent_hw
    if tuple(m.shape) == (h, w):
        return m.clone()
    W, H = loc.source_size
    if tuple(m.shape) != (H, W):
        raise EditError(
            f"the added mask is {m.shape[1]}x{m.shape[0]} (WxH) but the image is {W}x{H} (latent {w}x{h}); "
            "draw it on the same photo"
        )
    frac = torch.nn.functional.interpolate(m[None, None].float(), size=(h, w), mode="area")[0, 0]  # (h, w)
    return frac > threshold


def add_concept(loc: Localization, mask: np.ndarray | Tensor, attn: Tensor) -> Localization:
    """Add a concept from a user's mask (see :func:`latent_mask`); it takes its pixels from the concepts under it.

    Concepts that lose pixels get their centroids recomputed from ``attn``; one left empty is removed (noted in
    ``clusters.messages``).
    """
    attn = _check_attn(loc, attn, "add")
    new = latent_mask(mask, loc)
    if not bool(new.any()):
        raise EditError("add: the mask covers no latent pixel (draw a larger region: one latent pixel is "
                        f"{loc.source_size[0] // loc.latent_hw[1]}x{loc.source_size[1] // loc.latent_hw[0]} px)")
    c = loc.clusters
    masks, centroids, emptied = [], [], []
    for j in range(loc.num_concepts):
        m = c.masks[j] & ~new
        if not bool(m.any()):
            emptied.append(j + 1)
            continue
        masks.append(m)
        same = bool((m == c.masks[j]).all())
        centroids.append(c.centroids[j] if same else concept_centroid(m, attn, c.pre_labels, c.clustering))
    masks.append(new)
    centroids.append(concept_centroid(new, attn, c.pre_labels, c.clustering))
    note = f"edit: added a concept of {int(new.sum())} latent pixels"
    if emptied:
        note += f" (it covered concepts {', '.join(map(str, emptied))}, removed)"
    return _rebuild(loc, torch.stack(masks), torch.stack(centroids), note)


def apply_edits(loc, *, merge=(), drop=(), split=(), masks=(), attn: torch.Tensor | None = None):
    """Apply 1-based edits, all numbered as on ``loc``'s overlay, in the order drop → merge → split → add.

    A concept is followed through the edits by its first pixel (raster order), which stays inside it until it is
    dropped or split. Returns (new Localization, list of edit descriptions).
    """
    n = loc.num_concepts
    groups = [list(g) for g in merge]
    drop = [i for g in drop for i in g]
    split = [i for g in split for i in g]
    named = [*drop, *[i for g in groups for i in g], *split]
    bad = sorted({i for i in named if not 1 <= i <= n})
    if bad:
        raise EditError(f"concept {bad[0]} does not exist: the run has {n} concepts (1…{n} on its overlay)")
    if len(named) != len(set(named)):
        twice = sorted({i for i in named if named.count(i) > 1})
        raise EditError(f"concept {twice[0]} is named by more than one edit; give each concept one edit")
    if any(len(g) < 2 for g in groups):
        raise EditError(f"--merge needs at least two concepts, got {','.join(map(str, min(groups, key=len)))}")
    anchors = {i + 1: int(torch.nonzero(loc.clusters.masks[i].reshape(-1))[0]) for i in range(n)}

    def current(cur, number: int) -> int:
        return int(cur.clusters.post_labels.reshape(-1)[anchors[number]])

    done = []
    if drop:
        loc = drop_concepts(loc, [i - 1 for i in drop])
        done.append(f"drop {','.join(map(str, drop))}")
    for g in groups:
        loc = merge_concepts(loc, [current(loc, i) for i in g], attn=attn)
        done.append(f"merge {','.join(map(str, g))}")
    for i in split:
        loc = split_concept(loc, current(loc, i), attn)
        done.append(f"split {i}")
    for k, m in enumerate(masks):
        loc = add_concept(loc, m, attn)
        done.append(f"add mask {k + 1}")
    return loc, done
