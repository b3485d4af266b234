"""The toy model's card (docs/toy-world.md) stays a card: short, every result file it cites exists, the history linked."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "docs" / "toy-world.md"
RESULTS = ROOT / "benchmarks" / "results" / "toy"


def test_the_card_is_at_most_150_lines_and_links_the_history_once():
    text = CARD.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert text.count("](../benchmarks/results/toy/HISTORY.md)") == 1 and (RESULTS / "HISTORY.md").is_file()


def test_every_result_file_the_card_cites_exists():
    names = set(re.findall(r"`(run[\w{},.-]+\.json)`", CARD.read_text(encoding="utf-8")))
    files = set()
    for name in names:  # `run10_extract12_{full,no-attn-reg}.json` names several
        brace = re.search(r"\{([^}]*)\}", name)
        files |= {name[: brace.start()] + part + name[brace.end():] for part in brace.group(1).split(",")} if brace \
            else {name}
    assert len(files) >= 8, files
    assert sorted(f for f in files if not (RESULTS / f).is_file()) == []
