"""The library never imports the shell, imports run one way (no cycle), and lazy imports are the allowed few.

Reads the source with ``benchmarks/import_graph.py`` (nothing is imported), plus one subprocess check that
``import conceptexpress`` stays light.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "conceptexpress"

# Imports that stay inside functions, and why: optional or heavy dependencies needed by one code path only.
ALLOWED_LAZY = {
    "conceptexpress.attention": {"conceptexpress.attention", "conceptexpress.attention.capture"},  # keeps aggregate diffusers-free
    "conceptexpress.models": {"conceptexpress.models", "conceptexpress.models.loading"},  # keeps models.hf diffusers-free
    "conceptexpress.cli.ui": {"gradio", "conceptexpress.ui.app"},  # the `ui` extra: only `conceptexpress ui` needs it
    "conceptexpress.ui.app": {"pandas"},  # gradio's LinePlot data, only when a loss plot is drawn
    "conceptexpress.models.hf": {"transformers", "transformers.utils"},  # evaluation encoders
    "conceptexpress.evaluate.encoders": {"transformers"},
    "conceptexpress.evaluate.sam": {"transformers"},
    "conceptexpress.evaluate.testing": {"transformers"},
    "conceptexpress.io.lock": {"fcntl", "msvcrt"},  # one of the two exists, per platform
    "conceptexpress.learn.losses": {"ot", "ot.batch"},  # POT takes seconds to import; only the EMD term needs it
    "conceptexpress.baselines.clustering": {"sklearn.cluster"},  # the `eval` extra
    "conceptexpress.baselines.maskcut": {"transformers"},
}


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle():
    report = _graph().report(PACKAGE)
    assert report["cycles"] == 0, report["cycle_members"]


def test_the_library_never_imports_the_shell():
    # `__main__` modules are entry points (shells themselves): `python -m conceptexpress`, `python -m conceptexpress.toy`.
    assert _graph().report(PACKAGE)["shell_imports_from_library"] == []


def test_imports_sit_at_the_top_except_the_allowed_lazy_ones():
    graph = _graph()
    lazy = []
    for module, info in graph.scan(PACKAGE).items():
        if module.startswith("conceptexpress.toy"):  # the toy world's training script: its own rules
            continue
        for target, in_function, line in info["imports"]:
            if in_function and target not in ALLOWED_LAZY.get(module, ()):
                lazy.append(f"{module}:{line} {target}")
    assert lazy == []


def test_layers_point_one_way():
    # errors/config -> io -> models, attention, localize, learn -> baselines -> extract, generate, export
    # -> dataset, evaluate, locbench -> cli. A dotted name places one module apart from its package: the
    # composition modules of a package (learn.api: localization to tokens, with the baselines) sit with extract.
    order = [
        ("errors", "config"),
        ("io", "viz"),
        ("models", "attention", "localize", "learn", "sampler"),
        ("baselines",),
        ("extract", "generate", "export", "learn.api", "io.run_edit"),
        ("dataset", "evaluate", "locbench", "ui"),
        ("cli", "__main__"),
    ]
    level = {name: i for i, names in enumerate(order) for name in names}

    def layer(module: str) -> str | None:
        parts = module.split(".")[1:]
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in level:
                return ".".join(parts[:n])
        return None

    edges = _graph().report(PACKAGE, with_edges=True)["edges"]
    wrong = []
    for source, targets in edges.items():
        here = layer(source)
        if here is None:
            continue
        for target in targets:
            there = layer(target)
            if there is None or there == here:
                continue
            if level[there] > level[here]:
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_import_conceptexpress_pulls_no_diffusers_or_transformers(heavy_imports):
    assert heavy_imports["conceptexpress"] == []


def test_python_dash_m_conceptexpress_runs_the_command_line(import_probe):
    step = import_probe["python -m conceptexpress --version"]
    assert step["exit"] == 0 and step["stdout"].startswith("conceptexpress "), step
