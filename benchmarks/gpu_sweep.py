"""Token learning on an accelerator: seconds per step and peak memory over precision × micro-batch × checkpointing,
and exact vs batched-Sinkhorn EMD. Prints one JSON object (one row per setting).

Made for the occasional GPU session (no network there: the full-size SD 2.1-base architecture is built with random
weights, which costs the same time and memory as the real weights). Each setting builds a fresh
:class:`~conceptexpress.learn.trainer.TokenTrainer` on synthetic masks, runs ``--warmup`` steps, then times
``--steps`` split-phase steps (g·N prompts, the phase with the most UNet passes) with CUDA synchronisation.

    python benchmarks/gpu_sweep.py --device cuda                          # SD 2.1-base at 512 px, the full sweep
    python benchmarks/gpu_sweep.py --arch sdxl --device cuda --weights bf16   # SDXL base at 1024 px
    python benchmarks/gpu_sweep.py --arch tiny --device cpu --steps 1     # smoke run on a CPU (tiny model)

The SDXL architecture is built in memory (``conceptexpress.testing.sdxl_random_pipeline``, 2.6 B random parameters
on the device) instead of being written to disk and loaded back. Concepts are drawn on the family's clustering grid
(the latent for SD 2.1, latent/2 for SDXL), as the localizer hands them to the trainer. Compare the peaks with the
simulated ones of ``benchmarks/memory.py`` (docs/scaling.md).

A setting that runs out of memory is reported as ``"oom": true`` and the sweep goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train import synthetic_concepts  # noqa: E402  (the masks benchmarks/train.py uses)


class _Stop(Exception):
    """Ends a timed run after its steps (the trainer's schedule is longer, so it stays in the split phase)."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_setting(pipe, image, work, latent, n: int, device: str, *, mixed_precision: str, micro_batch: int,
                checkpointing: bool, emd_method: str, warmup: int, steps: int) -> dict:
    from conceptexpress.config import RuntimeConfig, TrainConfig
    from conceptexpress.learn.trainer import TokenTrainer
    from conceptexpress.models.family import family_of

    masks, cents = synthetic_concepts(n, family_of(pipe).clustering_grid(pipe, latent))
    total = warmup + steps
    cfg = TrainConfig(steps=total + 2, merge_step=total + 1, emd_method=emd_method)
    runtime = RuntimeConfig(micro_batch=micro_batch, gradient_checkpointing=checkpointing,
                            mixed_precision=mixed_precision, checkpoint_every=0)
    row = {"mixed_precision": mixed_precision, "micro_batch": micro_batch, "gradient_checkpointing": checkpointing,
           "emd_method": emd_method}
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    else:
        pipe.unet.disable_gradient_checkpointing()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer = TokenTrainer(pipe, image, work, masks, cents, cfg, runtime=runtime)
        stamps, records = [], []

        def clock(_trainer, record) -> None:  # a training callback: called after every step
            _sync(device)
            stamps.append(time.perf_counter())
            records.append(record)
            if len(records) == total:
                raise _Stop

        _sync(device)
        stamps.append(time.perf_counter())
        with contextlib.suppress(_Stop):
            trainer.train(callbacks=[clock])
        times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
        record = records[-1]
        row.update(prompts_per_step=record["prompts"], s_per_step=round(sum(times) / len(times), 3),
                   s_per_sample_pass=round(sum(times) / len(times) / record["prompts"], 4),
                   amp_dtype=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else None,
                   grad_norm=record.get("grad_norm"), oom=False)
    except torch.OutOfMemoryError:
        row["oom"] = True
    if device.startswith("cuda"):
        row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd21", "sdxl", "tiny", "tiny-sdxl"), default="sd21")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default="fp16", choices=("fp16", "bf16", "fp32"), help="UNet/text-encoder dtype")
    parser.add_argument("--precisions", default="auto,fp16,bf16")
    parser.add_argument("--micro-batches", default="1,4,8")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--emd", default="exact,sinkhorn", help="EMD solvers, timed at the first setting's options")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from conceptexpress.io.images import load_image, model_input_size
    from conceptexpress.models import load_pipeline
    from conceptexpress.models.family import family_of
    from conceptexpress.models.loading import keep_vae_fp32, resolve_dtype
    from conceptexpress.testing import (
        save_sd21_random_pipeline,
        save_tiny_pipeline,
        save_tiny_sdxl_pipeline,
        sdxl_random_pipeline,
    )

    out = {"device": args.device, "arch": args.arch, "weights": args.weights, "concepts": args.concepts,
           "torch": torch.__version__, "rows": []}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch == "sdxl":
            dtype = resolve_dtype(args.weights, torch.device(args.device))
            pipe = sdxl_random_pipeline(Path(tmp) / "tok", device=args.device, dtype=dtype)
            if dtype == torch.float16:
                keep_vae_fp32(pipe.vae)  # as load_pipeline keeps SDXL's VAE (it overflows in fp16)
        else:
            save = {"tiny": save_tiny_pipeline, "tiny-sdxl": save_tiny_sdxl_pipeline,
                    "sd21": save_sd21_random_pipeline}[args.arch]
            pipe = load_pipeline(str(save(Path(tmp) / args.arch)), device=args.device, dtype=args.weights)
        res = args.resolution or family_of(pipe).native_resolution(pipe)
        out.update(family=family_of(pipe).name, resolution=res)
        image = load_image(ROOT / "examples" / "coffee.jpg")
        work = model_input_size(image.size, res, pipe.vae_scale_factor)
        latent = (work[1] // pipe.vae_scale_factor, work[0] // pipe.vae_scale_factor)
        out.update(work_size=list(work), latent_size=list(latent))
        precisions = args.precisions.split(",")
        micro = [int(m) for m in args.micro_batches.split(",")]
        ckpt = [c == "on" for c in args.checkpointing.split(",")]
        emds = args.emd.split(",")
        common = {"warmup": args.warmup, "steps": args.steps}
        for prec, mb, ck in itertools.product(precisions, micro, ckpt):
            row = run_setting(pipe, image, work, latent, args.concepts, args.device, mixed_precision=prec,
                              micro_batch=mb, checkpointing=ck, emd_method=emds[0], **common)
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        for emd in emds[1:]:
            row = run_setting(pipe, image, work, latent, args.concepts, args.device, mixed_precision=precisions[0],
                              micro_batch=micro[0], checkpointing=ckpt[0], emd_method=emd, **common)
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
