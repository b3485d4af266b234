"""Re-make docs/toy-demo.png: the README's no-network demo on the shipped toy model.

    python docs/make_toy_demo.py [--scene 503] [--out /tmp/toy-demo]

Runs the README's three commands (scene → extract 60 steps, merge at 12, lr 4e-3 → generate "a photo of <c1>" ×4) through
the command line and composes: the photo, the overlay, four samples of <c1> (64-px tiles drawn ×3 with nearest
neighbour; the overlay, drawn at 512 px, shrunk to the same tile). Prints each concept's best-matching object
with its IoU and what `read_objects` sees in the samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conceptexpress.cli import main as cli
from conceptexpress.toy import read_objects, render_scene, toy_pipeline_path

TILE, GAP = 192, 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", type=int, default=503)
    ap.add_argument("--out", default="/tmp/toy-demo")
    ap.add_argument("--figure", default=str(Path(__file__).with_name("toy-demo.png")))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scene = render_scene(args.scene)
    photo = out / "scene.png"
    scene.image.save(photo)
    run = out / "run"
    model = str(toy_pipeline_path())
    if cli(["-q", "extract", str(photo), "--model", model, "--out", str(run), "--steps", "60", "--merge-step", "12",
            "--lr", "4e-3", "--overwrite"]):
        return 1
    if cli(["-q", "generate", str(run), "a photo of <c1>", "-n", "4", "--out", str(out / "generated")]):
        return 1
    samples = sorted((out / "generated").rglob("*.png"))[:4]
    tiles = [Image.open(photo), Image.open(run / "overlay.png"), *map(Image.open, samples)]
    figure = Image.new("RGB", (len(tiles) * TILE + (len(tiles) - 1) * GAP, TILE), "white")
    for i, tile in enumerate(tiles):
        resample = Image.Resampling.NEAREST if tile.width <= TILE else Image.Resampling.LANCZOS  # pixels / text
        figure.paste(tile.convert("RGB").resize((TILE, TILE), resample), (i * (TILE + GAP), 0))
    figure.save(args.figure)
    manifest = json.loads((run / "manifest.json").read_text())
    concepts = {}  # per token: the object its mask overlaps most, and that IoU (the README's description)
    for t in manifest["tokens"]:
        mask = np.asarray(Image.open(run / t["mask"])) > 127
        ious = [float((mask & m).sum() / (mask | m).sum()) for m in scene.masks]
        best = int(np.argmax(ious))
        concepts[t["token"]] = {"object": " ".join(scene.objects[best]), "iou": round(ious[best], 3)}
    print(json.dumps({"caption": scene.caption, "concepts": concepts, "samples_of_c1": [read_objects(Image.open(s))
                                                                                        for s in samples],
                      "figure": args.figure}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
