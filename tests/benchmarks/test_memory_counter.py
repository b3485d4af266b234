"""The instruments of `benchmarks/memory.py`: its live-bytes counter reads the same peak on fake tensors as on a
real CPU run of the trainer's step, agrees with an independent count, and the FLOP counter is exact on a matmul."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode  # noqa: F401  (the exact matmul test)

from conceptexpress.config import RuntimeConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_flops_are_exact_under_fake_tensors(memory):
    with memory.simulation() as (_, live), FlopCounterMode(display=False) as flops, live:
        a = torch.empty(64, 96, dtype=torch.float16)
        b = torch.empty(96, 80, dtype=torch.float16)
        c = a @ b
    assert flops.get_total_flops() == 2 * 64 * 96 * 80
    assert c.shape == (64, 80)
    # a, b and c live at the end, each counted once (views share their storage).
    assert live.current == live.peak == 2 * (64 * 96 + 96 * 80 + 64 * 80)


def test_counter_frees_storages_and_counts_views_once(memory):
    live = memory.LiveBytes("cpu")
    with live:
        x = torch.ones(1000)  # 4000 bytes
        v = x[10:]  # a view: no new storage
        y = x * 2  # 4000 more
        del x
        assert live.current == 8000  # the view keeps x's storage alive
        del v
        gc.collect()
        assert live.current == 4000
        del y
    assert live.peak == 8000 and live.current == 0


def _step(memory, pipe, live, checkpointing: bool = False, **kwargs) -> dict:
    masks, centroids = memory.concept_layout(16)  # the tiny model's 16×16 latent at 128 px
    config = TrainConfig(steps=1, split_tokens=1, emd_method="sinkhorn")  # one prompt per concept: fast
    runtime = RuntimeConfig(micro_batch=2, mixed_precision="no", checkpoint_every=0,
                            gradient_checkpointing=checkpointing)
    return memory.measure_train_step(pipe, memory.photo(128), (128, 128), masks, centroids, config, runtime, live=live,
                                     **kwargs)


@pytest.fixture(scope="module")
def real_steps(memory, tiny_sd2_dir):
    """One real CPU train step of the tiny pipeline without and with gradient checkpointing, counted by the
    benchmark's counter; without, also the bytes of every storage alive right after the UNet's forward (python-visible
    tensors and the autograd graph's saved tensors), counted independently, against the counter at that moment."""
    from conceptexpress.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    modules = memory.pipeline_modules(pipe)
    weights = [list(m.parameters()) + list(m.buffers()) for m in modules]

    def real(checkpointing, live):
        live.track(weights)
        return _step(memory, pipe, live, checkpointing)

    seen: list[tuple[int, int]] = []
    live_off = memory.LiveBytes("cpu")

    def after_forward(module, args, output):
        seen.append((live_off.current, _reachable_bytes(output.sample, weights)))

    hook = pipe.unet.register_forward_hook(after_forward)
    try:
        off = real(False, live_off)
    finally:
        hook.remove()
    on = real(True, memory.LiveBytes("cpu"))
    return {"pipe": pipe, "modules": modules, "off": off, "on": on, "seen": seen}


def _fake_step(memory, real_steps, checkpointing: bool) -> dict:
    """The same step on fake tensors (weights replaced by storage-less ones)."""
    gc.collect()
    modules = real_steps["modules"]
    with memory.simulation(cuda_like=False) as (_, fake):
        memory.to_fake_device(modules)
        fake.track([list(m.parameters()) + list(m.buffers()) for m in modules])
        return _step(memory, real_steps["pipe"], fake, checkpointing)


def test_fake_peak_equals_real_peak_of_a_train_step(memory, real_steps):
    real_out = real_steps["off"]
    fake_out = _fake_step(memory, real_steps, False)
    assert real_out["flops"] == fake_out["flops"] > 0
    assert fake_out["step_peak_gb"] == pytest.approx(real_out["step_peak_gb"], rel=0.03)
    assert fake_out["init_peak_gb"] == pytest.approx(real_out["init_peak_gb"], rel=0.03)
    # The counter holds at least what is reachable from the loss's graph, and not much more.
    seen = real_steps["seen"]
    assert seen
    for counted, reachable in seen:
        assert reachable <= counted <= 1.1 * reachable
    print(f"real peaks {real_out}; fake peaks {fake_out}; after-forward counted/reachable {seen}")


def test_checkpointed_step_fake_equals_real_and_peaks_lower(memory, real_steps):
    """Gradient checkpointing: the counter reads the same peak on fake tensors as on real ones, and the step peaks
    lower than without checkpointing (the checkpointed blocks keep only their inputs for the backward) while its
    FLOPs grow by the recomputed forwards. (FlopCounterMode's per-module tracking kept the recomputed activations
    alive, so a checkpointed step read *higher* than an unchecked one: the benchmark's FlopCounter drops it.)"""
    real_off, real_on = real_steps["off"], real_steps["on"]
    fake_on = _fake_step(memory, real_steps, True)
    assert fake_on["flops"] == real_on["flops"] > real_off["flops"]
    assert fake_on["step_peak_gb"] == pytest.approx(real_on["step_peak_gb"], rel=0.03)
    assert real_on["step_peak_gb"] < 0.8 * real_off["step_peak_gb"]
    mb = {k: round(v["step_peak_gb"] * 2**30 / 1e6, 3) for k, v in {"off": real_off, "on": real_on, "on_fake": fake_on}.items()}
    print(f"step peaks MB {mb}; GFLOP off {real_off['flops'] / 1e9:.3f}, on {real_on['flops'] / 1e9:.3f}")


def _reachable_bytes(root: torch.Tensor, weights) -> int:
    """Bytes of the distinct storages reachable from ``root``'s autograd graph (saved tensors, leaves) plus the
    weights — an independent count of what a forward must keep for backward."""
    storages: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()

    for group in weights:
        for t in group:
            add(t)
    add(root)
    stack, seen = [root.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for name in dir(fn):
            if name.startswith("_saved_"):
                try:
                    value = getattr(fn, name)
                except RuntimeError:  # freed or not a tensor
                    continue
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    add(v)
        if hasattr(fn, "variable"):
            add(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return sum(storages.values())
