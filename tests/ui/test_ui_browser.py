"""End to end in a real browser: `conceptexpress ui` served by the command line, driven in headless Chromium.

Upload the photo → see N concepts → merge two → paint a region and add it → train a few steps → generate one image → download the zip and
check its files. Screenshots of every stage go to ``$UI_ARTIFACTS`` (default ``test-artifacts/ui/``), with
``timings.json``. Chromium is Debian's ``chromium`` package (``apt-get install chromium``), driven by the
``playwright`` Python package through that executable: nothing downloads a browser. The model is the tiny random
one unless ``CONCEPTEXPRESS_UI_TEST_MODEL`` names another (e.g. the trained toy model's folder), and the photo
``examples/coffee.jpg`` unless ``CONCEPTEXPRESS_UI_TEST_PHOTO`` names another; ``CONCEPTEXPRESS_UI_TEST_FIGURES=1``
trains and samples long enough for the screenshots to show concepts (``docs/ui/make_figures.py`` says how the
README's pictures are made).

Skip it with ``-m "not browser"``; it skips itself, saying why, when Chromium, playwright or gradio is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "coffee.jpg"
PHOTO = Path(os.environ.get("CONCEPTEXPRESS_UI_TEST_PHOTO") or EXAMPLE)
FIGURES = os.environ.get("CONCEPTEXPRESS_UI_TEST_FIGURES") == "1"
# (train steps, sampling steps): a few for the test; for pictures, the paper's 500 steps at the UI's learning rate
TRAIN_STEPS, SAMPLE_STEPS = (500, 25) if FIGURES else (4, 2)
PROMPT = "a photo of <c2>" if FIGURES else "a photo of <c1> on the beach"  # the toy world has no beach
GEN_N = 4 if FIGURES else 1  # the gallery shows one image cropped to its width, four whole
CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 900_000 if FIGURES else 240_000  # one stage on a busy 2-core CI runner (figures: 500 training steps)
STARTUP_S = 600  # importing gradio and torch and loading the model, on a busy runner (seen: 17–180+ s here)


def _missing(*modules: str, chromium: bool = False) -> str | None:
    """Why the test cannot run here (None: it can)."""
    if chromium and not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (Debian/Ubuntu: apt-get install chromium)"
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"the {module} package is missing (pip install -e '.[test,ui]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a listening TCP socket on ``port`` (Linux /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


@pytest.fixture(scope="module")
def server(tiny_sd2_dir, tmp_path_factory):
    reason = _missing("gradio")
    if reason:
        pytest.skip(reason)
    model = os.environ.get("CONCEPTEXPRESS_UI_TEST_MODEL") or str(tiny_sd2_dir)
    port = _free_port()
    workdir = tmp_path_factory.mktemp("ui-server")
    argv = ["ui", "--model", model, "--device", "cpu", "--port", str(port), "--workdir", str(workdir),
            "--example", str(EXAMPLE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed below
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from conceptexpress.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`conceptexpress ui` exited with {proc.returncode}: {(workdir / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() - start > STARTUP_S:
                    pytest.fail(f"`conceptexpress ui` did not answer within {STARTUP_S} s")
                time.sleep(0.5)
        yield {"url": url, "port": port, "startup_s": time.monotonic() - start, "workdir": workdir}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_serves_on_localhost_only(server):
    assert _listening_addresses(server["port"]) == {"0100007F"}  # 127.0.0.1, nothing else


def test_serves_no_other_files(server):
    """Only gradio's cache and WORKDIR/downloads are served: not the runs of other tabs, not the file system."""
    run_file = server["workdir"] / "runs" / "someone" / "photo.png"
    run_file.parent.mkdir(parents=True)
    run_file.write_bytes(b"x")
    zip_file = server["workdir"] / "downloads" / "someone" / "conceptexpress-run.zip"
    zip_file.parent.mkdir(parents=True)
    zip_file.write_bytes(b"z")

    def status(path: Path) -> int:
        try:
            return urllib.request.urlopen(f"{server['url']}gradio_api/file={path}", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(Path("/etc/passwd")) == 403
    assert status(ROOT / "README.md") == 403
    assert status(run_file) == 403
    assert status(zip_file) == 200


def test_upload_merge_train_generate_download(server, tmp_path):
    reason = _missing("playwright", chromium=True)
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    artifacts = Path(os.environ.get("UI_ARTIFACTS", ROOT / "test-artifacts" / "ui"))
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    timings: dict[str, float] = {"server_startup": round(server["startup_s"], 1)}
    clock = [time.monotonic()]

    def lap(name: str, page, section: str) -> None:
        """Time the stage; screenshot the page and the stage's section (docs/ui/ is made from the sections)."""
        timings[name] = round(time.monotonic() - clock[0], 1)
        stem = f"{len(timings) - 1:02d}-{name}"
        page.screenshot(path=str(artifacts / f"{stem}.png"), full_page=True)
        page.locator(section).screenshot(path=str(artifacts / f"{stem}-section.png"))
        clock[0] = time.monotonic()

    def number(elem_id: str, value: int) -> None:
        box = page.locator(f"#{elem_id} input").first
        box.fill(str(value))
        box.press("Tab")

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(server["url"])
            status = page.locator("#status")

            # 1. Upload.
            page.locator("#upload input[type=file]").set_input_files(str(PHOTO))
            expect(status).to_contain_text("photo ready")
            lap("upload", page, "#photo-row")

            # 2. Localize: N numbered concepts.
            page.locator("#localize").click()
            expect(page.locator("#count")).to_contain_text("found")
            n = int(re.search(r"(\d+) concepts? found", page.locator("#count").inner_text()).group(1))
            assert n >= 2
            expect(page.locator("#select input[type=checkbox]")).to_have_count(n)
            lap("concepts", page, "#concepts-row")

            # 3. Merge concepts 1 and 2.
            boxes = page.locator("#select input[type=checkbox]")
            boxes.nth(0).check()
            boxes.nth(1).check()
            page.locator("#merge").click()
            expect(page.locator("#count")).to_contain_text(f"{n - 1} concept")
            expect(page.locator("#count")).to_contain_text("merge 1,2")
            lap("merged", page, "#concepts-row")

            # 4. Paint a region on the photo and add it as a concept.
            page.get_by_text("Draw a concept to add").click()
            page.locator("#draw button[aria-label=Brush]").click()
            box = page.locator("#draw canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2 - 100, box["y"] + box["height"] / 2 + 40
            page.mouse.move(x, y)
            page.mouse.down()
            for dx, dy in ((160, 0), (160, 30)):  # few events: each redraws the canvas (0.5–1 s headless)
                page.mouse.move(x + dx, y + dy)
            page.mouse.up()
            page.locator("#draw-section").screenshot(path=str(artifacts / "04a-painted-section.png"))
            page.locator("#add").click()
            expect(page.locator("#count")).to_contain_text("add mask 1")
            n_now = int(re.search(r"(\d+) concepts? found", page.locator("#count").inner_text()).group(1))
            lap("added", page, "#concepts-row")

            # 5. Train a few steps, with samples.
            number("steps", TRAIN_STEPS)
            number("split-tokens", 2)
            number("samples-n", 1)
            number("sample-steps", SAMPLE_STEPS)
            page.locator("#train").click()
            expect(page.locator("#train-status")).to_contain_text("done")
            expect(page.locator("#samples img")).not_to_have_count(0)
            lap("trained", page, "#train-section")

            # 6. Generate one image.
            page.locator("#prompt textarea").fill(PROMPT)
            number("gen-n", GEN_N)
            number("gen-steps", SAMPLE_STEPS)
            page.locator("#generate").click()
            expect(status).to_contain_text(f"generated {GEN_N} image")
            expect(page.locator("#generated img")).not_to_have_count(0)
            lap("generated", page, "#results-section")

            # 7. Download the zip and check its files.
            page.locator("#zip").click()
            link = page.locator("#zip-file a").first
            expect(link).to_be_visible()
            with page.expect_download() as info:
                link.click()
            path = tmp_path / "run.zip"
            info.value.save_as(path)
            lap("download", page, "#download-row")
        except Exception:
            page.screenshot(path=str(artifacts / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()

    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("manifest.json"))
    k = manifest["num_concepts"]
    assert k == n_now
    expected = {"manifest.json", "localization.json", "overlay.png", "loss.png"}
    for i in range(1, k + 1):
        expected |= {f"concepts/c{i}.safetensors", f"a1111/c{i}.safetensors", f"masks/concept_{i:02d}.png"}
    assert expected <= names, sorted(expected - names)
    timings["total_browser"] = round(sum(v for key, v in timings.items() if key != "server_startup"), 1)
    (artifacts / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
