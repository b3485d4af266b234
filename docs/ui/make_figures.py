"""One-off: shrink the browser test's section screenshots into the small PNGs the README shows.

The pictures are made with the shipped toy model on toy scene 503 (so they show concepts, not the tiny random
model's noise), enlarged to 512 px with nearest neighbour (localization resizes it to the model's native 64 px; the
page's brush is sized for a photo, not for 64 px); ``CONCEPTEXPRESS_UI_TEST_FIGURES=1`` trains the paper's 500 steps
(about 4 minutes on a CPU), samples with 25 steps and generates 4 images:

    python3 -c "from PIL import Image; from conceptexpress.toy import render_scene; \
        render_scene(503).image.resize((512, 512), Image.Resampling.NEAREST).save('/tmp/scene503-512.png')"
    CONCEPTEXPRESS_UI_TEST_MODEL="$(python3 -m conceptexpress.toy path)" CONCEPTEXPRESS_UI_TEST_PHOTO=/tmp/scene503-512.png \
        CONCEPTEXPRESS_UI_TEST_FIGURES=1 python3 -m pytest -q tests/ui/test_ui_browser.py   # test-artifacts/ui/*-section.png
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
