"""Time concept localization end to end on the full-size SD 2.1-base architecture (random weights).

Prints one JSON object: seconds for each stage (VAE encode + UNet pass with capture, clustering, mask
upsampling), the total, and peak memory (process RSS on CPU; CUDA peak allocation on GPU). The weights are
random, so the number of concepts is meaningless; the cost is the real one (same shapes, same layers).

    python benchmarks/localize.py                       # writes the random pipeline to a temp dir first
    python benchmarks/localize.py --model DIR --device cuda --dtype fp16
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: write the random SD 2.1 architecture)")
    parser.add_argument("--image", default=str(ROOT / "examples" / "coffee.jpg"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--weighting", default="released")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from conceptexpress.attention.localizer import ConceptLocalizer
    from conceptexpress.config import LocalizeConfig
    from conceptexpress.io.images import load_image
    from conceptexpress.models import load_pipeline

    tmp = None
    model = args.model
    t0 = time.perf_counter()
    if model is None:
        from conceptexpress.testing import save_sd21_random_pipeline

        tmp = tempfile.TemporaryDirectory()
        model = str(save_sd21_random_pipeline(Path(tmp.name) / "sd21"))
    write_s = time.perf_counter() - t0
    rss_before_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    image = load_image(args.image)
    localizer = ConceptLocalizer(pipe, LocalizeConfig(weighting=args.weighting))
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    timings = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loc = localizer(image)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - t0)

    attn_rows = loc.latent_hw[0] * loc.latent_hw[1]
    result = {
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
        "image_size": list(loc.source_size),
        "work_size": list(loc.work_size),
        "latent_size": list(loc.latent_hw),
        "attention_rows": attn_rows,
        "self_attention_layers": loc.self_attention_layers,
        "cross_attention_layers": loc.cross_attention_layers,
        "num_concepts_random_weights": loc.num_concepts,
        "write_random_pipeline_s": round(write_s, 2),
        "load_s": round(load_s, 2),
        "localize_s": [round(t, 2) for t in timings],
        "stages_s_last_run": loc.timings,
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_load_MiB": round(rss_before_load, 1),
    }
    if pipe.device.type == "cuda":
        result["cuda_peak_allocated_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    json.dump(result, sys.stdout, indent=2)
    print()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
