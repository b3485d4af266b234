"""One-off: shrink the browser test's section screenshots into the small PNGs the README shows.

    python3 -m pytest -q tests/ui/test_ui_browser.py      # writes test-artifacts/ui/*-section.png
    python3 docs/ui/make_figures.py                    # writes docs/ui/NN-stage.png (≤ 640 px wide, 64 colours)
"""

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
for src in sorted((ROOT / "test-artifacts" / "ui").glob("*-section.png")):
    im = Image.open(src).convert("RGB")
    if im.width > 640:
        im = im.resize((640, round(im.height * 640 / im.width)), Image.Resampling.LANCZOS)
    out = ROOT / "docs" / "ui" / src.name.replace("-section", "")
    im.quantize(64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(out.relative_to(ROOT), im.size, out.stat().st_size // 1024, "KB")
