"""Result files of ``conceptexpress evaluate``: per-concept and per-image rows, the summary, and paper Table 1.

``OUT/concepts.csv`` / ``concepts.json``   one row per concept × encoder (SIM^I, top-1/top-3 correct counts)
``OUT/images.csv`` / ``images.json``       one row per source image × encoder (SIM^C; the JSON adds each image's value)
``OUT/summary.json``                       method × encoder means, encoder/SAM ids, config, runs, skipped runs
``OUT/table.md``                           paper Table 1: one block per encoder, rows = methods, 3 decimals

Every file is written atomically; ``summary.json`` is written last, so its presence means the evaluation finished.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_json, atomic_write_text

__all__ = ["METRICS", "format_table", "method_name", "write_report"]

# (key in summary.json, column title of paper Table 1)
METRICS = (("sim_i", "SIM^I"), ("sim_c", "SIM^C"), ("acc1", "ACC^1"), ("acc3", "ACC^3"))
_METHOD_NAMES = {"bas": "BaS", "bas-ft": "BaS f.t.", "bas-dagger": "BaS†", "conceptexpress": "ConceptExpress"}
# Paper Table 1 lists the supervised references (grey), then the baseline, and "Ours" last.
_METHOD_ORDER = ("bas", "bas-ft", "bas-dagger", "conceptexpress")
_ENCODER_NAMES = {"clip": "CLIP", "dino": "DINO"}
_SCHEDULER_NAMES = {
    "ddim": "DDIM (released sampler)", "pipeline": "the model's own scheduler", "pndm": "PNDM",
    "dpmsolver": "DPM-Solver++", "euler": "Euler",
}

CONCEPT_COLUMNS = (
    "method", "run", "token", "concept", "encoder", "encoder_model", "sim_i", "images", "top1_correct",
    "top3_correct", "prototypes", "sam_score", "sam_area", "sam_fallback",
)
IMAGE_COLUMNS = ("method", "run", "image", "encoder", "encoder_model", "sim_c", "images")


def method_name(method: str) -> str:
    """Display name of a row label (``bas-dagger`` → ``BaS†``, ``conceptexpress -SnM`` → ``ConceptExpress −SnM``)."""
    base, _, ablations = method.partition(" ")
    name = _METHOD_NAMES.get(base, base)
    return f"{name} {ablations.replace('-', '−')}" if ablations else name


def method_order(methods) -> list[str]:
    # Paper Table 1's order of base methods (supervised references, baseline, ours; unknown methods before ours);
    # within ConceptExpress, ablations (most switched off first, as paper Table 2) and supervised runs before the
    # full method.
    rank = {m: float(i) for i, m in enumerate(_METHOD_ORDER)}

    def key(label: str):
        base, _, rest = label.partition(" ")
        r = rank.get(base, rank["conceptexpress"] - 0.5)
        if base == "conceptexpress":
            return (r, rest == "", -rest.count("-"), rest)
        return (r, False, 0, rest)

    return sorted(methods, key=key)


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(summary: dict[str, Any]) -> str:
    """Markdown shaped like paper Table 1 from ``summary.json``'s content: one block per encoder."""
    config = summary["config"]
    methods = summary["methods"]
    sched = config.get("scheduler", "pipeline")  # summaries written before the option sampled with the model's own
    lines = [
        "# Concept similarity and classification accuracy (paper Table 1)",
        "",
        f"{summary['num_runs']} source images, {summary['num_concepts']} concepts; "
        f"{config['images_per_concept']} images per concept (\"a photo of [V_i]\"), "
        f"{config['compositional_images']} per image (\"a photo of [V_1] and … [V_N]\"); "
        f"{_SCHEDULER_NAMES.get(sched, sched)}, {config['steps']} steps, guidance {config['guidance']}, "
        f"seed {config['seed']}; "
        f"SAM `{summary['sam']}` with {config['sam_points']} points"
        f"{', masks cropped to their box' if config['crop'] else ''}.",
    ]
    for letter, (enc, enc_id) in zip("abcdefgh", summary["encoders"].items()):
        lines += [
            "",
            f"## ({letter}) {_ENCODER_NAMES.get(enc, enc)} (`{enc_id}`)",
            "",
            "| Method | " + " | ".join(title for _, title in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for method in method_order(methods):
            scores = methods[method]["metrics"][enc]
            cells = ["—" if scores.get(key) is None else f"{scores[key]:.3f}" for key, _ in METRICS]
            lines.append(f"| {method_name(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    out: Path, concepts: list[dict[str, Any]], images: list[dict[str, Any]], summary: dict[str, Any]
) -> str:
    """Write the files of the module docstring to ``out`` (which must exist); returns the table's text."""
    atomic_write_text(out / "concepts.csv", _csv(concepts, CONCEPT_COLUMNS))
    atomic_write_json(out / "concepts.json", concepts)
    atomic_write_text(out / "images.csv", _csv(images, IMAGE_COLUMNS))
    atomic_write_json(out / "images.json", images)
    table = format_table(summary)
    atomic_write_text(out / "table.md", table)
    atomic_write_json(out / "summary.json", summary)
    return table
