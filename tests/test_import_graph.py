"""The library never imports the shell, imports run one way (no cycle), and lazy imports are the allowed few.

Reads the source with ``benchmarks/import_graph.py`` (nothing is imported), plus subprocess checks that
``import conceptexpress`` and every ``--help`` of the command line stay light.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "conceptexpress"

# Imports that stay inside functions, and why: optional or heavy dependencies needed by one code path only.
ALLOWED_LAZY = {
    "conceptexpress.attention": {"conceptexpress.attention", "conceptexpress.attention.capture"},  # keeps aggregate diffusers-free
    "conceptexpress.models": {"conceptexpress.models", "conceptexpress.models.loading"},  # keeps models.hf diffusers-free
    "conceptexpress.cli.ui": {"gradio", "conceptexpress.ui.app"},  # the `ui` extra: only `conceptexpress ui` needs it
    "conceptexpress.cli._quiet": {"transformers", "diffusers"},  # their logging is set once a command will run
    "conceptexpress.ui.app": {"pandas"},  # gradio's LinePlot data, only when a loss plot is drawn
    "conceptexpress.models.hf": {"transformers", "transformers.utils"},
    "conceptexpress.models.tokenizer_files": {"transformers"},  # writing a tokenizer folder only  # evaluation encoders
    "conceptexpress.evaluate.encoders": {"transformers"},
    "conceptexpress.evaluate.sam": {"transformers"},
    "conceptexpress.evaluate.testing": {"transformers"},
    "conceptexpress.io.lock": {"fcntl", "msvcrt"},  # one of the two exists, per platform
    "conceptexpress.learn.losses": {"ot", "ot.batch"},  # POT takes seconds to import; only the EMD term needs it
    "conceptexpress.baselines.clustering": {"sklearn.cluster"},  # the `eval` extra
    "conceptexpress.baselines.maskcut": {"transformers"},
}


def _allowed_lazy(module: str, target: str) -> bool:
    # The shell parses first and imports the library only in the command that runs (diffusers' `commands/`): every
    # library module pulls torch or diffusers somewhere below it, and `conceptexpress COMMAND --help` must answer
    # without them (test_every_help_imports_no_model_library). So a command module may import any library module
    # inside its `run`, but not the shell itself nor an outside library except those listed above.
    if module.startswith("conceptexpress.cli.") and target.startswith("conceptexpress."):
        return not target.startswith("conceptexpress.cli")
    return target in ALLOWED_LAZY.get(module, ())


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
            if in_function and not _allowed_lazy(module, target):
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
        ("extract", "generate", "export", "learn.api", "localization_stage"),
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


def test_localize_imports_neither_diffusers_nor_the_model_layer_even_inside_functions():
    # The pure core (clustering, the Localization result and its edits) runs on tensors alone.
    banned = ("diffusers", "transformers", "conceptexpress.models", "conceptexpress.attention.capture",
              "conceptexpress.attention.localizer")
    found = [
        f"{module}:{line} {target}"
        for module, info in _graph().scan(PACKAGE).items()
        if module.startswith("conceptexpress.localize")
        for target, _in_function, line in info["imports"]
        if any(target == b or target.startswith(b + ".") for b in banned)
    ]
    assert found == []


def test_io_draws_no_pictures():
    # io/ reads and writes files; the stage that makes a picture draws it (localization_stage: overlay, stages).
    import ast

    found = [
        f"{module}:{line} {target}"
        for module, info in _graph().scan(PACKAGE).items()
        if module == "conceptexpress.io" or module.startswith("conceptexpress.io.")
        for target, _in_function, line in info["imports"]
        if target == "conceptexpress.viz"
    ]
    for path in sorted((PACKAGE / "io").glob("*.py")):  # PIL's drawing modules, however imported
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import | ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names += [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}:{node.lineno} {n}" for n in names
                      if n.startswith(("PIL.ImageDraw", "PIL.ImageFont"))]
    assert found == []


def test_shipped_code_never_imports_the_test_helpers():
    found = [
        f"{module}:{line} {target}"
        for module, info in _graph().scan(PACKAGE).items()
        if not module.startswith("conceptexpress.testing")
        for target, _in_function, line in info["imports"]
        if target == "conceptexpress.testing" or target.startswith("conceptexpress.testing.")
    ]
    assert found == []


def test_no_function_takes_more_than_ten_parameters():
    # A function with more is a config object waiting to be named (RunConfig is extract's).
    import ast

    wide = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                if count > 10:
                    wide.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({count})")
    assert wide == []
HEAVY = ("torch", "diffusers", "transformers", "gradio")


def _help_argv() -> list[list[str]]:
    from conceptexpress.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return [["--help"], *([name, "--help"] for name in sub.choices)]


@pytest.mark.parametrize("argv", _help_argv(), ids=lambda argv: " ".join(argv))
def test_every_help_imports_no_model_library(argv):
    """`conceptexpress [COMMAND] --help` answers without torch, diffusers, transformers or gradio (issue 26: it took
    5 s when the shell imported them). Asserted on `-X importtime`'s list of imported modules, not on time."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "conceptexpress", *argv], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and "usage: conceptexpress" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "conceptexpress.cli" in imported  # the list is the one of this command line
    assert sorted(m for m in imported if m.split(".")[0] in HEAVY) == []
