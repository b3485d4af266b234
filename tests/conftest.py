"""Shared fixtures: tiny random pipelines written once per session and loaded back like a user's model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (the README's `-n logical`) each worker gets its share of the cores: torch's default of one
    intra-op thread per core, in every worker, oversubscribes the machine (measured: `-n 2` with default threads
    took 382 s where one process took 161 s). Subprocesses the tests start inherit the setting."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """Tiny random SD pipeline whose tokenizer pads with '!' (SD 2.x style)."""
    from conceptexpress.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), pad_style="sd2")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """Tiny random SD pipeline whose tokenizer pads with the end-of-text token (SD 1.x style)."""
    from conceptexpress.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), pad_style="sd1")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """Tiny random SDXL pipeline (two text encoders of widths 32 and 48; see conceptexpress.testing.sdxl)."""
    from conceptexpress.testing import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd2_dir):
    """The SD 2.x-style tiny pipeline loaded in fp32 on CPU."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd2_dir)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"


@pytest.fixture(scope="module")
def pipe(tiny_sd2_dir):
    """The SD 2.x-style tiny pipeline loaded through `load_pipeline` (the user path), fp32 on CPU."""
    from conceptexpress.models import load_pipeline

    return load_pipeline(str(tiny_sd2_dir), device="cpu")


@pytest.fixture(scope="module")
def image():
    """The example photo (600×400 RGB)."""
    from conceptexpress.io.images import load_image

    return load_image(EXAMPLE)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for tiny models: on a busy 2-core runner, OpenMP threads spinning at barriers made the
    tiny UNet/ViT calls ~5x slower than a single thread (measured: 77 s vs 15 s for tests/test_eval_*)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Import-purity checks: one fresh interpreter runs these steps in order and reports, after each step, which heavy
# libraries are loaded (cumulative: a step is charged with everything loaded so far, so a check can only err
# towards failing), what the step printed and its exit code. The pure cores come first; the shell (which pulls
# diffusers) last. One subprocess instead of one per check saves ~1 s of interpreter + torch start-up per check.
IMPORT_STEPS = {
    "conceptexpress": "import conceptexpress",
    "conceptexpress.localize": "import conceptexpress.localize",
    "conceptexpress.learn.losses": "import conceptexpress.learn.losses",
    "conceptexpress.attention.aggregate": "import conceptexpress.attention.aggregate",
    "conceptexpress.attention": "import conceptexpress.attention as a; a.SelfAttentionAccumulator",
    "conceptexpress.evaluate.metrics": "import conceptexpress.evaluate.metrics",
    "conceptexpress.baselines.maskcut": "import conceptexpress.baselines.maskcut",
    "ui and cli": ("import conceptexpress.ui, conceptexpress.ui.session, conceptexpress.cli; "
                   "conceptexpress.cli.build_parser()"),
    # what `python -m conceptexpress --version` runs (runpy is how -m runs a package's __main__)
    "python -m conceptexpress --version": (
        "import runpy, sys; sys.argv = ['conceptexpress', '--version']; "
        "runpy.run_module('conceptexpress', run_name='__main__', alter_sys=True)"),
}
_IMPORT_PROBE = """
import contextlib, io, json, sys
steps, report = json.loads(sys.argv[1]), {}
for name, code in steps.items():
    out, code_ = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            exec(code, {})
        except SystemExit as exc:
            code_ = exc.code if isinstance(exc.code, int) else 1
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "transformers", "gradio"})
    report[name] = {"heavy": heavy, "stdout": out.getvalue(), "exit": code_}
print(json.dumps(report))
"""


@pytest.fixture(scope="session")
def import_probe(tmp_path_factory) -> dict[str, dict]:
    """{step of IMPORT_STEPS: {"heavy": libraries loaded once it has run, "stdout": str, "exit": int}}."""
    import json
    import subprocess
    import sys

    def probe() -> str:
        proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, json.dumps(IMPORT_STEPS)], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return json.loads(probe())
    # pytest-xdist: the first worker to get here runs the probe, the others read its report (the workers' base
    # temporary folders share a parent; the pattern of pytest-xdist's docs, "making session-scoped fixtures
    # execute only once")
    from filelock import FileLock

    report = tmp_path_factory.getbasetemp().parent / "import-probe.json"
    with FileLock(str(report) + ".lock"):
        if not report.is_file():
            report.write_text(probe(), encoding="utf-8")
        return json.loads(report.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def heavy_imports(import_probe) -> dict[str, list[str]]:
    """{step of IMPORT_STEPS: heavy libraries (diffusers, transformers, gradio) loaded once it has run}."""
    return {name: step["heavy"] for name, step in import_probe.items()}
