"""Time concept clustering (paper §3.2) on a synthetic 64×64 latent against a plain 4096³ float32 matmul.

DESIGN §7 target: clustering a 64×64 attention (4096 rows) costs <= 1.3× the fastest 4096³ float32 matmul
(numpy or torch) measured in the same run. Prints one JSON object: the median times, their ratio (and the ratio
of the best runs, steadier on a shared machine), the torch thread count, and a breakdown (validation, first-round
KL, remaining FINCH rounds, filter + post-clustering). Timings are interleaved round-robin, so a change of load
on a shared machine hits all of them alike.

The attention is built from a label image (4 objects on a background) like the tests: every pixel attends to
its own region, to its neighbourhood and a little at random. Each timed call is preceded by a short pause:
on few cores, OpenBLAS and OpenMP workers keep spinning for a while after a call and would slow whatever runs
next, which would bias the comparison either way.

    python benchmarks/cluster.py [--repeats 7] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from conceptexpress.localize import cluster_concepts, finch, pairwise_symmetric_kl
from conceptexpress.localize.cluster import _validate

PAUSE_S = 0.5  # lets spinning BLAS/OpenMP workers go to sleep between timed calls


def label_image(size: int) -> torch.Tensor:
    """(size, size) int64: background 0, two rectangles and two discs, scaled from a 64×64 layout."""
    s = size / 64
    lab = torch.zeros(size, size, dtype=torch.long)
    lab[int(5 * s) : int(25 * s), int(5 * s) : int(25 * s)] = 1
    lab[int(36 * s) : int(60 * s), int(6 * s) : int(28 * s)] = 2
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    lab[(ys - 20 * s) ** 2 + (xs - 47 * s) ** 2 <= (11 * s) ** 2] = 3
    lab[(ys - 50 * s) ** 2 + (xs - 50 * s) ** 2 <= (9 * s) ** 2] = 4
    return lab


def synthetic_attention(labels: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Row-stochastic float32 (h*w, h*w): 0.6 own region + 0.3 Gaussian neighbourhood (σ = 4) + 0.1 noise."""
    h, w = labels.shape
    lab = labels.reshape(-1)
    n, k = lab.numel(), int(lab.max()) + 1
    onehot = F.one_hot(lab, k).float()  # (n, k)
    rows = 0.6 * (onehot / onehot.sum(0))[:, lab].T.contiguous()  # (n, n), row p: uniform over region of p
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()  # (n, 2)
    g = torch.cdist(pos, pos).square_().div_(-2 * 4.0**2).exp_()  # (n, n)
    rows += g.mul_(0.3 / g.sum(1, keepdim=True))
    del g
    noise = torch.rand(n, n, generator=torch.Generator().manual_seed(seed))
    rows += noise.mul_(0.1 / noise.sum(1, keepdim=True))
    return rows.div_(rows.sum(1, keepdim=True))


def eot_map(labels: torch.Tensor) -> torch.Tensor:
    noise = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    return 0.2 + 0.8 * (labels > 0).float() + 0.05 * noise


def interleaved_times(tasks: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Round-robin over the tasks, so that a change of machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=64, help="latent side h = w (64 for 512 px SD)")
    args = parser.parse_args()

    labels = label_image(args.size)
    attn = synthetic_attention(labels)  # (n, n) float32
    eot = eot_map(labels)
    n = attn.shape[0]
    rng = np.random.default_rng(0)
    a_np, b_np = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    kl = lambda rows: pairwise_symmetric_kl(rows)  # noqa: E731

    tasks: dict[str, Callable[[], object]] = {
        "matmul_numpy": lambda: a_np @ b_np,
        "matmul_torch": lambda: a_t @ b_t,
        "cluster_concepts": lambda: cluster_concepts(attn, eot),
        "validate": lambda: _validate(attn, eot, 10),
        "kl_first_round": lambda: kl(attn),
        "pre_clustering": lambda: finch(attn, kl),
    }
    for fn in tasks.values():  # warm-up: thread pools, allocator, page faults
        fn()
    load_before = os.getloadavg()[0]
    runs = interleaved_times(tasks, args.repeats)
    med = {name: statistics.median(t) for name, t in runs.items()}
    load_after = os.getloadavg()[0]

    result = cluster_concepts(attn, eot)
    fastest = min(("numpy", med["matmul_numpy"]), ("torch", med["matmul_torch"]), key=lambda kv: kv[1])
    out = {
        "n_rows": n,
        "latent": [args.size, args.size],
        "repeats": args.repeats,
        "cluster_s": round(med["cluster_concepts"], 4),
        "matmul_fastest_s": round(fastest[1], 4),
        "matmul_fastest": fastest[0],
        "ratio": round(med["cluster_concepts"] / fastest[1], 3),
        "target_ratio": 1.3,
        # Best-of-runs ratio: less sensitive to other processes on a shared machine than the medians.
        "ratio_of_minima": round(
            min(runs["cluster_concepts"]) / min(min(runs["matmul_numpy"]), min(runs["matmul_torch"])), 3
        ),
        "matmul_numpy_s": round(med["matmul_numpy"], 4),
        "matmul_torch_s": round(med["matmul_torch"], 4),
        "breakdown_s": {
            "validate": round(med["validate"], 4),
            "kl_first_round": round(med["kl_first_round"], 4),
            "finch_later_rounds": round(med["pre_clustering"] - med["kl_first_round"], 4),
            "filter_post_outputs": round(
                med["cluster_concepts"] - med["pre_clustering"] - med["validate"], 4
            ),
        },
        "pre_levels": list(result.levels),
        "pre_level": result.pre_level,
        "num_concepts": result.num_concepts,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
        "runs_s": {k: [round(t, 3) for t in v] for k, v in runs.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
