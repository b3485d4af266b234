"""Cost of token learning on CPU: UNet sample-passes per image and seconds per step, tiny and full-size.

Prints one JSON object. For each architecture (the tiny random pipeline and the full-size SD 2.1-base
architecture with random weights) it times one split-phase step (g·N prompts) and one merged-phase step
(N + 1 prompts) with the default losses (masked MSE, contrastive, exact EMD), reports peak memory, and sets
the sample-passes of the paper's full schedule (500 steps, merge at 100) beside the released code's count
2·(100·g·N + 400·(N+1)).

    python benchmarks/train.py                        # tiny + full size at 256 px, N = 3 concepts
    python benchmarks/train.py --arch sd21 --resolution 512 --micro-batch 4
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def synthetic_concepts(n: int, latent: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """n side-by-side rectangles as masks, centroids peaked on them (rows sum to 1)."""
    h, w = latent
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        masks[i, h // 4 : 3 * h // 4, i * w // n + 1 : (i + 1) * w // n - 1] = True
    cents = masks.flatten(1).float() + 0.01
    return masks, cents / cents.sum(1, keepdim=True)


def bench(model_dir: str, resolution: int, n: int, micro_batch: int, device: str) -> dict:
    """Time one split-phase and one merged-phase step of :class:`TokenTrainer` on ``model_dir``."""
    from conceptexpress.config import TrainConfig
    from conceptexpress.io.images import load_image, model_input_size
    from conceptexpress.learn.trainer import TokenTrainer, released_sample_passes
    from conceptexpress.models import load_pipeline

    pipe = load_pipeline(model_dir, device=device, dtype="fp32")
    vae_factor = pipe.vae_scale_factor
    image = load_image(ROOT / "examples" / "coffee.jpg")
    work = model_input_size(image.size, resolution, vae_factor)
    latent = (work[1] // vae_factor, work[0] // vae_factor)
    masks, cents = synthetic_concepts(n, latent)
    trainer = TokenTrainer(pipe, image, work, masks, cents, TrainConfig(steps=2, merge_step=1, micro_batch=micro_batch))
    seconds = []
    step = trainer.train_step

    def timed_step():
        t0 = time.perf_counter()
        record = step()
        seconds.append(round(time.perf_counter() - t0, 3))
        return record

    trainer.train_step = timed_step
    trainer.train()
    full = TrainConfig()
    return {
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
        "work_size": list(work),
        "latent_size": list(latent),
        "concepts": n,
        "micro_batch": micro_batch,
        "split_step_prompts": trainer.history[0]["prompts"],
        "merged_step_prompts": trainer.history[1]["prompts"],
        "split_step_s": seconds[0],
        "merged_step_s": seconds[1],
        "sample_passes_per_image_paper_schedule": (
            full.merge_step * full.split_tokens * n + (full.steps - full.merge_step) * (n + 1)
        ),
        "released_code_sample_passes": released_sample_passes(n, full),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd21", "both"), default="both")
    parser.add_argument("--resolution", type=int, default=256, help="full-size working resolution (tiny: native 128)")
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from conceptexpress.testing import save_sd21_random_pipeline, save_tiny_pipeline

    results = {"torch_threads": torch.get_num_threads(), "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        archs = ["tiny", "sd21"] if args.arch == "both" else [args.arch]
        for arch in archs:
            if arch == "tiny":
                path, res = save_tiny_pipeline(Path(tmp) / "tiny"), 128
            else:
                path, res = save_sd21_random_pipeline(Path(tmp) / "sd21"), args.resolution
            results[arch] = bench(str(path), res, args.concepts, args.micro_batch, args.device)
    results["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
