"""Quality of the method on the toy world (issue 7): prints JSON and writes a markdown table.

    python benchmarks/toy_quality.py --out outputs/toy-quality            # shipped toy model
    python benchmarks/toy_quality.py --model /tmp/toy/run1/step-1600 --sections caption,localize

Sections (held-out scenes: seeds < 1e6, never seen in training):
- caption: "a photo of a {colour} {shape}" for the 12 pairs × n seeds, DDIM 50 / 7.5; an image is correct when
  `read_objects` sees exactly that one object (and "contains" when the object is among those seen).
- localize: Hungarian IoU / Recall / Precision (locbench definitions) of ours (released and diffseg weighting),
  k-means@k and FINCH@k (k = number of objects), split by object count, and a random-weight UNet control; and
  "objects the [EOT] map keeps": the share of objects whose mean min-max-normalized [EOT] value exceeds the image's
  (Eq. 5 would keep a cluster equal to the object; what the filter lets through caps recall).
- partition: where the localization loses IoU, on the localize section's scenes (trained model): the best IoU a
  union of pre-clusters could give (each object gets the pre-clusters lying mostly inside it; 1 = the selected
  pre-clustering level cuts along the objects' edges), the IoU of the concepts, pre-clusters and concepts per scene,
  and the Hungarian IoU with post-clustering's δ constraint on and off, in both clustering modes.
- extract: `extract` on held-out scenes per row (full, no-split-merge, no-attn-reg, batched update rule,
  BaS†); each concept sampled 4 times ("a photo of <ck>", DDIM 50 / 7.5); a concept is recovered when >= 3 of 4
  images show the colour and shape of the ground-truth object its mask matches (Hungarian, IoU >= 0.5).
  Scene i has 2 + i mod 3 objects unless --extract-objects says otherwise.
- recover: one-object scenes, full method; the concept overlapping the object most is sampled 4 times (DDIM 25);
  counted: samples showing the object's colour / colour and shape, against a control whose learning rate is 1e-12.
The token learning rate of extract and recover is the paper's 5e-4 scaled by 500 / --steps (the paper's total step
size over the shorter CPU schedule) unless --lr is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conceptexpress import LocalizeConfig, ModelConfig, TrainConfig, load_pipeline
from conceptexpress.attention.localizer import ConceptLocalizer
from conceptexpress.baselines.clustering import finch_fixed_concepts, kmeans_concepts
from conceptexpress.config import RunConfig
from conceptexpress.extract import SampleConfig, extract
from conceptexpress.io.images import upsample_masks
from conceptexpress.localize import cluster_concepts
from conceptexpress.localize.eot_filter import min_max
from conceptexpress.locbench.matching import aggregate, match_masks
from conceptexpress.toy import COLORS, SHAPES, render_scene, toy_pipeline_path
from conceptexpress.toy.reader import read_objects

ROWS = {  # row: (TrainConfig overrides, method, LocalizeConfig overrides)
    "full": ({}, "conceptexpress", {}),
    "no-split-merge": ({"split_merge": False}, "conceptexpress", {}),
    "no-attn-reg": ({"attn_reg": False}, "conceptexpress", {}),
    "batched-rule": ({"update_rule": "batched", "contrastive_form": "paper"}, "conceptexpress", {}),
    "bas-dagger": ({}, "bas-dagger", {}),
    # Not a row of the paper's tables (so not in the default --rows): the full method with the DiffSeg weighting of
    # the aggregated self-attention — on the toy model the partition that cuts the objects into fewer pieces.
    "full-diffseg": ({}, "conceptexpress", {"weighting": "diffseg"}),
}
TABLE_ROWS = ("full", "no-split-merge", "no-attn-reg", "batched-rule", "bas-dagger")  # paper Tables 1/2


def caption_accuracy(pipe, per_pair: int) -> dict:
    from conceptexpress.generate import GenerateConfig, generate

    prompts = [f"a photo of a {c} {s}" for c in COLORS for s in SHAPES]
    images = generate(pipe, prompts, GenerateConfig(n=per_pair, seed=1000))
    exact = contains = colour_ok = shape_ok = 0
    per_prompt = {}
    for (c, s), prompt, imgs in zip([(c, s) for c in COLORS for s in SHAPES], prompts, images):
        hits = 0
        for img in imgs:
            seen = read_objects(img)
            exact += seen == [(c, s)]
            hits += seen == [(c, s)]
            contains += (c, s) in seen
            colour_ok += any(o[0] == c for o in seen)
            shape_ok += any(o[1] == s for o in seen)
        per_prompt[prompt] = hits / len(imgs)
    n = len(prompts) * per_pair
    return {"images": n, "accuracy": exact / n, "contains": contains / n, "colour": colour_ok / n,
            "shape": shape_ok / n, "per_prompt": per_prompt}


def _localizer(pipe, n_max: int, weighting: str, resolution: int | None) -> ConceptLocalizer:
    return ConceptLocalizer(pipe, LocalizeConfig(n_max=n_max, weighting=weighting, resolution=resolution))


def _pre_cluster_oracle(pre_labels: np.ndarray, gt: np.ndarray) -> list[float]:
    """Per object: IoU of the union of the pre-clusters lying mostly (> 50 % of their pixels) inside it."""
    pre = upsample_masks(pre_labels[None] == np.arange(pre_labels.max() + 1)[:, None, None], gt.shape[1:])
    inside = np.einsum("phw,khw->pk", pre.astype(np.float32), gt.astype(np.float32)) / pre.sum((1, 2))[:, None]
    out = []
    for k, g in enumerate(gt):
        u = pre[inside[:, k] > 0.5].any(0)
        out.append(float((u & g).sum() / (u | g).sum()))
    return out


def partition(pipe, scenes: int, n_max: int, resolution: int | None, upright: bool) -> dict:
    out: dict = {}
    for w in ("released", "diffseg"):
        loc = _localizer(pipe, n_max, w, resolution)
        oracle: dict[str, list[float]] = {}
        counts: dict[str, list[tuple[int, int]]] = {}
        matches: dict[str, dict[str, list]] = {}
        for i in range(scenes):
            scene = render_scene(i, num_objects=1 + i % 4, upright=upright)
            group = "1-object" if len(scene.objects) == 1 else "2-4-object"
            maps = loc.attention(scene.image)
            for mode in ("released", "paper"):
                for delta in (True, False):
                    c = cluster_concepts(maps.attn, maps.eot, n_max=n_max, clustering=mode, delta_constraint=delta)
                    m = c.masks.numpy()
                    up = upsample_masks(m, scene.image.size) if len(m) else np.zeros((0, *scene.masks.shape[1:]), bool)
                    key = f"{mode} clustering, δ {'on' if delta else 'off'}"
                    matches.setdefault(key, {}).setdefault(group, []).append(match_masks(up, scene.masks))
                    if mode == "released" and delta:
                        oracle.setdefault(group, []).extend(_pre_cluster_oracle(c.pre_labels.numpy(), scene.masks))
                        counts.setdefault(group, []).append((int(c.pre_labels.max()) + 1, len(m)))
        out[w] = {
            "pre_cluster_oracle_iou": {g: float(np.mean(v)) for g, v in oracle.items()},
            "pre_clusters_per_scene": {g: float(np.mean([a for a, _ in v])) for g, v in counts.items()},
            "concepts_per_scene": {g: float(np.mean([b for _, b in v])) for g, v in counts.items()},
            "iou": {key: {g: aggregate(v).iou for g, v in by_g.items()} for key, by_g in matches.items()},
            "recall": {key: {g: aggregate(v).recall for g, v in by_g.items()} for key, by_g in matches.items()},
        }
    return out


def _random_unet_pipe(pipe):
    from copy import copy

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    control = copy(pipe)
    control.unet = UNet2DConditionModel.from_config(pipe.unet.config).to(pipe.unet.dtype).eval()
    return control


def _objects_kept_by_eot(eot: torch.Tensor, gt: np.ndarray) -> list[bool]:
    """Per object: is its mean min-max-normalized [EOT] value above the image mean (Eq. 5 on the object itself)?"""
    e = min_max(eot).float().flatten()
    frac = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(gt.astype(np.float32))[:, None], eot.shape)
    inside = frac[:, 0].flatten(1) > 0.5  # (K, h·w) latent pixels mostly inside the object
    return [bool(e[m].mean() > e.mean()) for m in inside if m.any()]


def localization(pipe, scenes: int, n_max: int, resolution: int | None, upright: bool) -> dict:
    pipes = {"trained": pipe, "random-unet": _random_unet_pipe(pipe)}
    matches: dict[str, dict[int, list]] = {}
    kept: dict[int, list[bool]] = {}
    for model_name, p in pipes.items():
        locs = {w: _localizer(p, n_max, w, resolution) for w in ("released", "diffseg")}
        for i in range(scenes):
            scene = render_scene(i, num_objects=1 + i % 4, upright=upright)
            gt = scene.masks
            k = len(scene.objects)
            preds = {}
            for w, loc in locs.items():
                maps = loc.attention(scene.image)
                clusters = cluster_concepts(maps.attn, maps.eot, n_max=n_max)
                preds[f"ours-{w}"] = clusters.masks.numpy()
                if w == "released" and model_name == "trained":
                    kept.setdefault(k, []).extend(_objects_kept_by_eot(maps.eot, gt))
                if w == "released":
                    preds[f"kmeans@k-{w}"] = kmeans_concepts(maps.attn, maps.eot, k).masks
                    preds[f"finch@k-{w}"] = finch_fixed_concepts(maps.attn, maps.eot, k).masks
            for name, m in preds.items():
                up = upsample_masks(m, scene.image.size) if len(m) else np.zeros((0, *gt.shape[1:]), bool)
                key = f"{model_name}/{name}"
                matches.setdefault(key, {}).setdefault(k, []).append(match_masks(up, gt))
    out = {}
    for key, by_k in matches.items():
        row = {f"{k}-object": aggregate(v).to_dict() for k, v in sorted(by_k.items())}
        row["2-4-object"] = aggregate([m for k, v in by_k.items() if k > 1 for m in v]).to_dict()
        row["all"] = aggregate([m for v in by_k.values() for m in v]).to_dict()
        out[key] = row
    out["eot_objects_kept"] = {f"{k}-object": float(np.mean(v)) for k, v in sorted(kept.items())}
    return out


def _extract_scene(pipe, model: str, scene, src: Path, out: Path, cfg: TrainConfig, method: str = "conceptexpress",
                   sample_steps: int = SampleConfig.sample_steps, localize: LocalizeConfig | None = None
                   ) -> list[tuple[str, np.ndarray, list[Path]]]:
    """``extract`` on ``scene`` (saved to ``src``) into ``out``: per concept (token, mask, its 4 sample files)."""
    scene.image.save(src)
    manifest = extract(src, out, RunConfig(model=ModelConfig(model=model), train=cfg, progress=False, method=method, localize=localize or LocalizeConfig(), sample=SampleConfig(sample_count=4, sample_steps=sample_steps)), pipe=pipe)
    return [(t["token"], np.asarray(Image.open(out / t["mask"])) > 127,
             sorted((out / "samples").glob(f"{t['token'].strip('<>')}_*.png"))) for t in manifest["tokens"]]


def extraction(pipe, model: str, rows: list[str], scenes: list[int], steps: int, merge_step: int, work: Path,
               counts: tuple[int, ...], lr: float, upright: bool) -> dict:
    """Scene ``i`` has ``counts[i % len(counts)]`` objects (the default: 2 + i mod 3, as in every table so far)."""
    results = {}
    for row in rows:
        overrides, method, loc = ROWS[row]
        per_concept = []
        t0 = time.time()
        for i in scenes:
            scene = render_scene(i, num_objects=counts[i % len(counts)], upright=upright)
            cfg = TrainConfig(steps=steps, merge_step=merge_step, lr=lr, micro_batch=0, checkpoint_every=0, **overrides)
            concepts = _extract_scene(pipe, model, scene, work / f"scene_{i}.png", work / row / f"scene_{i}", cfg, method,
                                      localize=LocalizeConfig(**loc) if loc else None)
            match = match_masks(np.stack([mask for _, mask, _ in concepts]), scene.masks)
            gt_of = {int(p): int(g) for (p, g), iou in zip(match.pairs, match.pair_ious) if iou >= 0.5}
            for j, (token, _, imgs) in enumerate(concepts):
                target = scene.objects[gt_of[j]] if j in gt_of else None
                shown = [target in read_objects(Image.open(f)) for f in imgs] if target else [False] * len(imgs)
                per_concept.append({"scene": i, "objects": len(scene.objects), "concept": token, "object": target,
                                    "shown": int(sum(shown)), "images": len(imgs),
                                    "recovered": bool(target) and sum(shown) >= 3})
        n = len(per_concept)
        by_count: dict[str, list[dict]] = {}
        for c in per_concept:
            by_count.setdefault(str(c["objects"]), []).append(c)
        results[row] = {
            "scenes": len(scenes), "concepts": n,
            "matched_to_object": sum(c["object"] is not None for c in per_concept) / max(n, 1),
            "recovered": sum(c["recovered"] for c in per_concept) / max(n, 1),
            "seconds": round(time.time() - t0, 1), "per_concept": per_concept,
            "by_object_count": {k: {"concepts": len(cs), "recovered": sum(c["recovered"] for c in cs) / len(cs)}
                                for k, cs in sorted(by_count.items())},
        }
    return results


def token_recovery(pipe, model: str, seeds: list[int], steps: int, merge_step: int, lr: float, work: Path,
                   upright: bool, sample_steps: int = 25) -> dict:
    """One-object scenes: ``extract`` (full method), then the concept whose mask overlaps the object most is sampled
    4 times ("a photo of <ck>"); counted: samples whose objects (read by `read_objects`) include the object's colour,
    and its colour and shape. The control repeats it with the learning rate at 1e-12 (the tokens stay at their
    initialization: what the samples show without learning)."""
    out: dict = {}
    for name, rate in (("learned", lr), ("control", 1e-12)):
        rows, t0 = [], time.time()
        for i in seeds:
            scene = render_scene(i, num_objects=1, upright=upright)
            cfg = TrainConfig(steps=steps, merge_step=merge_step, lr=rate, micro_batch=0, checkpoint_every=0)
            concepts = _extract_scene(pipe, model, scene, work / f"one_{i}.png", work / f"recover-{name}" / f"scene_{i}",
                                      cfg, sample_steps=sample_steps)
            ious = [(m & scene.masks[0]).sum() / max((m | scene.masks[0]).sum(), 1) for _, m, _ in concepts]
            best = int(np.argmax(ious))
            read = [read_objects(Image.open(f)) for f in concepts[best][2]]
            colour, shape = scene.objects[0]
            rows.append({"scene": i, "object": [colour, shape], "concepts": len(concepts), "iou": round(float(ious[best]), 3),
                         "colour_shown": sum(any(c == colour for c, _ in r) for r in read),
                         "object_shown": sum((colour, shape) in r for r in read), "images": len(read)})
        out[name] = {
            "lr": rate, "per_scene": rows, "seconds": round(time.time() - t0, 1),
            "colour_recovered": sum(r["colour_shown"] >= 3 for r in rows) / len(rows),
            "object_recovered": sum(r["object_shown"] >= 3 for r in rows) / len(rows),
            "colour_images": sum(r["colour_shown"] for r in rows) / max(sum(r["images"] for r in rows), 1),
        }
    out["schedule"] = {"steps": steps, "merge_step": merge_step, "samples": 4, "sample_steps": sample_steps}
    return out


def markdown(report: dict) -> str:
    lines = ["# Toy-world quality", ""]
    if "caption" in report:
        c = report["caption"]
        lines += ["## Caption → image (single object)", "",
                  f"{c['images']} images: accuracy {c['accuracy']:.3f} (exactly the named object), contains "
                  f"{c['contains']:.3f}, colour {c['colour']:.3f}, shape {c['shape']:.3f}", ""]
    if "partition" in report:
        lines += ["## Where localization loses IoU (trained model; 1 object / 2–4 objects)", "",
                  "| weighting | pre-cluster oracle IoU | pre-clusters | concepts | "
                  + " | ".join(report["partition"]["released"]["iou"]) + " |", "|---" * 8 + "|"]
        for w, r in report["partition"].items():
            pair = lambda d: " / ".join(f"{d[g]:.3g}" for g in ("1-object", "2-4-object") if g in d)  # noqa: E731
            lines.append(f"| {w} | {pair(r['pre_cluster_oracle_iou'])} | {pair(r['pre_clusters_per_scene'])} | "
                         f"{pair(r['concepts_per_scene'])} | " + " | ".join(pair(v) for v in r["iou"].values()) + " |")
        lines.append("")
    if "localize" in report:
        lines += ["## Localization (micro averages; IoU / Recall / Precision)", "",
                  "| model / method | 1 object | 2 objects | 3 objects | 4 objects | 2–4 objects |", "|---|---|---|---|---|---|"]
        for key, row in report["localize"].items():
            if key == "eot_objects_kept":
                continue
            cells = [f"{row[s]['iou']:.3f} / {row[s]['recall']:.3f} / {row[s]['precision']:.3f}" if s in row else "–"
                     for s in ("1-object", "2-object", "3-object", "4-object", "2-4-object")]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        if "eot_objects_kept" in report["localize"]:
            lines += ["", "Objects the [EOT] map keeps (Eq. 5 on the object itself), trained model: " + ", ".join(
                f"{k} {v:.2f}" for k, v in report["localize"]["eot_objects_kept"].items())]
        lines.append("")
    if "extract" in report:
        lines += ["## Extraction (concepts recovered: >= 3 of 4 samples show the object)", "",
                  "| row | scenes | concepts | matched to an object | recovered | seconds |", "|---|---|---|---|---|---|"]
        for row, r in report["extract"].items():
            lines.append(f"| {row} | {r['scenes']} | {r['concepts']} | {r['matched_to_object']:.3f} | "
                         f"{r['recovered']:.3f} | {r['seconds']} |")
        lines += ["", "Recovered by object count of the scene: " + "; ".join(
            f"{row}: " + ", ".join(f"{k} obj. {v['recovered']:.2f} of {v['concepts']}" for k, v in r["by_object_count"].items())
            for row, r in report["extract"].items())]
    if "recover" in report:
        r = report["recover"]
        lines += ["", "## One-object token recovery (best-matching concept, 4 samples)", "",
                  "| tokens | scenes | colour in >= 3 of 4 | object in >= 3 of 4 | images showing the colour |",
                  "|---|---|---|---|---|"]
        for name in ("learned", "control"):
            x = r[name]
            lines.append(f"| {name} (lr {x['lr']:g}) | {len(x['per_scene'])} | {x['colour_recovered']:.2f} | "
                         f"{x['object_recovered']:.2f} | {x['colour_images']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="toy pipeline folder (default: the shipped one)")
    ap.add_argument("--sections", default="caption,localize,partition,extract,recover")
    ap.add_argument("--caption-per-pair", type=int, default=5, help="images per (colour, shape) caption")
    ap.add_argument("--scenes", type=int, default=60, help="held-out scenes for localization (1-4 objects, balanced)")
    ap.add_argument("--n-max", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=None,
                    help="localize/partition: image side fed to the model (default: its native 64 px; a diagnosis "
                         "knob: 128 gives every attention level twice the cells per object)")
    ap.add_argument("--rows", default=",".join(TABLE_ROWS),
                    help=f"extraction rows, of {', '.join(ROWS)} (default: the paper's five)")
    ap.add_argument("--extract-scenes", type=int, default=12)
    ap.add_argument("--extract-first", type=int, default=500, help="seed of the first extraction scene")
    ap.add_argument("--extract-objects", default="2,3,4",
                    help="object counts of the extraction scenes, cycled by seed (seed i: counts[i %% len])")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--merge-step", type=int, default=30)
    ap.add_argument("--lr", type=float, default=None,
                    help="token learning rate of extract/recover (default: the paper's 5e-4 x 500 / --steps, i.e. the "
                         "paper's total step size over a shorter schedule)")
    ap.add_argument("--recover-scenes", type=int, default=8, help="one-object scenes of the recover section")
    ap.add_argument("--recover-first", type=int, default=920, help="seed of the first recover scene")
    ap.add_argument("--upright", action=argparse.BooleanOptionalAction, default=True,
                    help="held-out scenes of the world with unrotated squares and triangles (the default since run10, "
                         "shipped); --no-upright: the rotated world of runs 1-9")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for toy_quality.json / .md (and extraction runs)")
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown row(s) {', '.join(unknown)}; rows are {', '.join(ROWS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(toy_pipeline_path())
    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    sections = set(args.sections.split(","))
    lr = args.lr if args.lr is not None else TrainConfig.lr * 500 / args.steps
    report: dict = {"model": model, "threads": torch.get_num_threads(), "resolution": args.resolution,
                    "upright": args.upright}
    t0 = time.time()
    if "caption" in sections:
        report["caption"] = caption_accuracy(pipe, args.caption_per_pair)
    if "localize" in sections:
        report["localize"] = localization(pipe, args.scenes, args.n_max, args.resolution, args.upright)
    if "partition" in sections:
        report["partition"] = partition(pipe, args.scenes, args.n_max, args.resolution, args.upright)
    if "extract" in sections:
        work = Path(args.out) / "runs" if args.out else Path(tempfile.mkdtemp(prefix="toy-extract-"))
        work.mkdir(parents=True, exist_ok=True)
        scenes = list(range(args.extract_first, args.extract_first + args.extract_scenes))
        counts = tuple(int(k) for k in args.extract_objects.split(","))
        report["extract"] = extraction(pipe, model, args.rows.split(","), scenes, args.steps, args.merge_step, work,
                                       counts, lr, args.upright)
        report["extract_schedule"] = {"steps": args.steps, "merge_step": args.merge_step, "samples": 4, "lr": lr,
                                      "object_counts": list(counts)}
    if "recover" in sections:
        work = Path(args.out) / "runs" if args.out else Path(tempfile.mkdtemp(prefix="toy-recover-"))
        work.mkdir(parents=True, exist_ok=True)
        seeds = list(range(args.recover_first, args.recover_first + args.recover_scenes))
        report["recover"] = token_recovery(pipe, model, seeds, args.steps, args.merge_step, lr, work, args.upright)
    report["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "toy_quality.json").write_text(text, encoding="utf-8")
        Path(args.out, "toy_quality.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
