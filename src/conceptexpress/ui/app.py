"""The gradio page: photo → concepts (numbered, coloured) → edit → train (live loss, cancel) → generate → zip.

All logic lives in :mod:`conceptexpress.ui.session`; this module only lays it out and turns its results and
errors into page updates. Every element the browser test touches has an ``elem_id``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from ..config import TrainConfig
from ..errors import ConceptExpressError, InputError
from ..io.images import load_image
from ..io.run_folder import RunFolder
from ..viz import concept_colors
from .session import Session, Studio

TITLE = "ConceptExpress"
INTRO = (
    "Extract every object of one photo into its own text token. **1** upload a photo (or use the example) · "
    "**2** find its concepts · **3** fix them (merge, drop, split, or draw one to add) · **4** train · "
    "**5** generate with `<c1>`, `<c2>`, … · **6** download the tokens (diffusers and A1111 files)."
)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _error(exc: BaseException) -> str:
    if isinstance(exc, ConceptExpressError):
        return f"error: {exc}"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"error: internal error ({type(exc).__name__}: {first})"


def _in_background(fn: Callable[..., Any], **kwargs: Any) -> Iterator[str]:
    """Run ``fn(on_wait=…, **kwargs)`` in a thread; yield its waiting messages; return its value (``yield from``)."""
    box: dict[str, Any] = {}
    messages: list[str] = []
    thread = threading.Thread(target=lambda: box.update(_call(fn, messages.append, kwargs)), daemon=True)
    thread.start()
    shown = 0
    while thread.is_alive():
        thread.join(0.25)
        if len(messages) > shown:
            shown = len(messages)
            yield messages[-1]
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _relay(inner: Iterator[str], wrap: Callable[[str], dict]):
    """``yield from`` ``inner`` with each message wrapped into a page update; returns ``inner``'s value."""
    while True:
        try:
            message = next(inner)
        except StopIteration as stop:
            return stop.value
        yield wrap(message)


def _call(fn, on_wait, kwargs) -> dict[str, Any]:
    try:
        return {"value": fn(on_wait=on_wait, **kwargs)}
    except BaseException as exc:  # re-raised in the handler's thread
        return {"error": exc}


def concept_view(session: Session):
    """AnnotatedImage value and colour map: the photo with one numbered, coloured region per concept."""

    loc = session.loc
    photo = np.asarray(load_image(session.image_path))
    labels = [str(i + 1) for i in range(loc.num_concepts)]
    colours = {label: _hex(c) for label, c in zip(labels, concept_colors(loc.num_concepts))}
    return (photo, [(m.astype(np.float32), label) for m, label in zip(loc.masks, labels)]), colours


def build_app(studio: Studio) -> gr.Blocks:
    """The page, bound to ``studio`` (model already loaded or loaded on first use)."""
    example = studio.config.example if studio.config.example and studio.config.example.is_file() else None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        sid = gr.State(None)
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        status = gr.Markdown("", elem_id="status")

        # 1. Photo.
        with gr.Row(elem_id="photo-row"):
            with gr.Column(scale=1):
                upload = gr.File(label="Photo (PNG, JPEG, WebP, …)", file_types=["image"], type="filepath",
                                 elem_id="upload")
                use_example = gr.Button("Use the example photo", elem_id="example", visible=example is not None)
                localize_btn = gr.Button("Find the concepts", variant="primary", elem_id="localize")
            photo = gr.Image(label="Photo", interactive=False, elem_id="photo", scale=1, height=320)

        # 2. Concepts.
        with gr.Row(elem_id="concepts-row"):
            with gr.Column(scale=2):
                concepts = gr.AnnotatedImage(label="Concepts", elem_id="concepts", height=360)
                count = gr.Markdown("", elem_id="count")
            with gr.Column(scale=1):
                gr.Markdown("### Fix the concepts\nSelect by number, then merge, drop or split; or draw a region "
                            "below and add it as a concept.")
                select = gr.CheckboxGroup(choices=[], label="Concepts", elem_id="select")
                with gr.Row():
                    merge_btn = gr.Button("Merge", elem_id="merge")
                    drop_btn = gr.Button("Drop", elem_id="drop")
                    split_btn = gr.Button("Split", elem_id="split")
        with gr.Accordion("Draw a concept to add", open=False, elem_id="draw-section"):
            editor = gr.ImageEditor(label="Paint the region", type="numpy", elem_id="draw",
                                    brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"), height=360)
            add_btn = gr.Button("Add the painted region as a concept", elem_id="add")
        with gr.Accordion("Localization stages", open=False):
            stages = gr.Image(label="pre-clustering | filtering | post-clustering", interactive=False,
                              elem_id="stages")

        # 3. Training.
        with gr.Column(elem_id="train-section"):
            gr.Markdown("### Train one token per concept")
            with gr.Row():
                steps = gr.Number(value=TrainConfig.steps, precision=0, minimum=1, label="steps (paper: 500)",
                                  elem_id="steps")
                split_tokens = gr.Number(value=TrainConfig.split_tokens, precision=0, minimum=1,
                                         label="split tokens per concept (paper: 5)", elem_id="split-tokens")
                samples_n = gr.Number(value=2, precision=0, minimum=0, label="samples per concept", elem_id="samples-n")
                sample_steps = gr.Number(value=50, precision=0, minimum=1, label="sampling steps", elem_id="sample-steps")
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="train")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            train_status = gr.Markdown("", elem_id="train-status")
            loss_plot = gr.LinePlot(x="step", y="loss", title="loss", elem_id="loss", height=240)

        # 4. Results.
        with gr.Column(elem_id="results-section"):
            samples = gr.Gallery(label="Samples: each concept alone, then all together", columns=6, elem_id="samples",
                                 height=260)
            with gr.Row():
                prompt = gr.Textbox(value="a photo of <c1>", label="Prompt (use <c1>, <c2>, …, or 'all')",
                                    elem_id="prompt", scale=3)
                gen_n = gr.Number(value=1, precision=0, minimum=1, maximum=16, label="images", elem_id="gen-n", scale=1)
                gen_steps = gr.Number(value=50, precision=0, minimum=1, maximum=200, label="steps", elem_id="gen-steps",
                                      scale=1)
                gen_btn = gr.Button("Generate", elem_id="generate", scale=1)
            generated = gr.Gallery(label="Generated", columns=4, elem_id="generated", height=260)
        with gr.Row(elem_id="download-row"):
            zip_btn = gr.Button("Prepare the download (zip)", elem_id="zip")
            zip_file = gr.File(label="Run (tokens, manifest, masks)", interactive=False, elem_id="zip-file")

        # ------------------------------------------------------------------ handlers
        def _session(current: str | None) -> Session:
            return studio.session(current)

        def take_photo(path, current):
            if not path:
                return {status: ""}
            try:
                session = studio.new_session() if current is None else _session(current)
                session.set_image(path)
            except Exception as exc:  # noqa: BLE001 - shown in the page
                return {status: _error(exc)}
            img = Image.open(session.image_path)
            return {sid: session.id, photo: img, status: "photo ready: press **Find the concepts**",
                    concepts: None, count: "", select: gr.CheckboxGroup(choices=[], value=[]),
                    editor: _blank_canvas(session),
                    samples: [], generated: [], zip_file: None, train_status: "", loss_plot: None}

        def take_example(current):
            return take_photo(str(example), current) if example else {status: "error: no example photo configured"}

        def show_concepts(session: Session, message: str) -> dict:
            value, colours = concept_view(session)
            n = session.loc.num_concepts
            edits = session.loc_manifest.get("edits", [])
            return {
                concepts: gr.AnnotatedImage(value=value, color_map=colours),
                count: f"**{n} concept{'s' if n != 1 else ''}** found" + (f" (edits: {'; '.join(edits)})" if edits else ""),
                select: gr.CheckboxGroup(choices=[str(i + 1) for i in range(n)], value=[]),
                stages: Image.open(session.run / RunFolder.STAGES),
                status: message,
            }

        def localize(current, progress=gr.Progress()):  # noqa: B008 - gradio injects it
            try:
                session = _session(current)
                progress(0.1, desc="localizing: one UNet pass and clustering")
                yield {status: "localizing…"}
                yield from _relay(_in_background(session.localize), lambda m: {status: m})
                progress(1.0)
            except Exception as exc:  # noqa: BLE001
                yield {status: _error(exc)}
                return
            n = session.loc.num_concepts
            yield show_concepts(session, f"found {n} concepts: check them, fix them if needed, then **Train**"
                                if n else "error: no salient concept found in this photo; try another")

        def editing(kind: str):
            def handler(current, selected, drawn):
                try:
                    session = _session(current)
                    numbers = sorted(int(s) for s in selected or [])
                    kwargs: dict[str, Any] = {}
                    if kind == "add":
                        kwargs["mask"] = _drawn_mask(drawn, session)
                    else:
                        kwargs[kind] = numbers
                    yield {status: f"{kind}…"}
                    done = yield from _relay(_in_background(session.edit, **kwargs), lambda m: {status: m})
                except Exception as exc:  # noqa: BLE001
                    yield {status: _error(exc)}
                    return
                update = show_concepts(session, f"edited ({'; '.join(done)}): {session.loc.num_concepts} concepts")
                if kind == "add":  # a clean canvas for the next region
                    update[editor] = _blank_canvas(session)
                yield update
            return handler

        def train(current, n_steps, g, n_samples, s_steps, progress=gr.Progress()):  # noqa: B008 - gradio injects it
            try:
                session = _session(current)
                total = int(n_steps)
                config = TrainConfig(steps=total, merge_step=min(TrainConfig.merge_step, max(1, total // 5)),
                                     split_tokens=int(g), checkpoint_every=max(1, min(50, total // 4)))
                job = session.start_training(config, samples=int(n_samples), sample_steps=int(s_steps))
            except Exception as exc:  # noqa: BLE001
                yield {train_status: _error(exc)}
                return
            shown = -1
            while not job.done.wait(0.5):
                if len(job.records) != shown:
                    shown = len(job.records)
                    progress(shown / total, desc="training")
                    yield {train_status: job.status, loss_plot: _loss_frame(job.records)}
                else:
                    yield {train_status: job.status}
            out = {train_status: job.status, loss_plot: _loss_frame(job.records)}
            if job.manifest is not None:
                out[samples] = [(Image.open(p), caption) for p, caption in session.samples()]
            yield out

        def cancel(current):
            try:
                session = _session(current)
            except Exception as exc:  # noqa: BLE001
                return {train_status: _error(exc)}
            if session.job is None or session.job.done.is_set():
                return {train_status: "nothing to cancel"}
            session.job.cancel()
            return {train_status: "cancelling after this step…"}

        def generate(current, text, n, n_steps):
            try:
                session = _session(current)
                yield {status: f"generating {text!r}…"}
                paths = yield from _relay(
                    _in_background(session.generate, prompt=text, n=int(n), steps=int(n_steps)), lambda m: {status: m}
                )
            except Exception as exc:  # noqa: BLE001
                yield {status: _error(exc)}
                return
            yield {generated: [(Image.open(p), text) for p in paths], status: f"generated {len(paths)} image(s)"}

        def make_zip(current):
            try:
                path = _session(current).zip()
            except Exception as exc:  # noqa: BLE001
                return {status: _error(exc)}
            return {zip_file: str(path), status: "the zip is ready: click its name to download"}

        photo_outputs = [sid, photo, status, concepts, count, select, editor, samples, generated, zip_file,
                         train_status, loss_plot]
        concept_outputs = [concepts, count, select, stages, status]
        upload.upload(take_photo, [upload, sid], photo_outputs)
        use_example.click(take_example, [sid], photo_outputs)
        localize_btn.click(localize, [sid], concept_outputs)
        for kind, btn in (("merge", merge_btn), ("drop", drop_btn), ("split", split_btn), ("add", add_btn)):
            btn.click(editing(kind), [sid, select, editor], [*concept_outputs, editor])
        train_btn.click(train, [sid, steps, split_tokens, samples_n, sample_steps], [train_status, loss_plot, samples])
        cancel_btn.click(cancel, [sid], [train_status])
        gen_btn.click(generate, [sid, prompt, gen_n, gen_steps], [generated, status])
        zip_btn.click(make_zip, [sid], [zip_file, status])
    # The model lock serializes the heavy work across tabs and tells a waiting tab why; gradio's own queue
    # would only say "queued".
    app.queue(default_concurrency_limit=None, max_size=64)
    return app


def _blank_canvas(session: Session) -> dict:
    """ImageEditor value: the photo as background, nothing painted."""
    photo = np.asarray(Image.open(session.image_path).convert("RGB"))
    return {"background": photo, "layers": [], "composite": None}


def _loss_frame(records):
    import pandas as pd

    return pd.DataFrame({"step": [r["step"] for r in records], "loss": [float(r["loss"]) for r in records]})


def _drawn_mask(drawn, session: Session) -> np.ndarray:
    """The painted layer of the ImageEditor as an (H, W) bool mask at the photo's size."""

    layers = (drawn or {}).get("layers") or []
    if not layers:
        raise InputError("paint a region on the photo first (open 'Draw a concept to add')")
    alpha = np.zeros(np.asarray(layers[0]).shape[:2], dtype=bool)
    for layer in layers:
        arr = np.asarray(layer)
        alpha |= arr[..., 3] > 0 if arr.ndim == 3 and arr.shape[-1] == 4 else arr.reshape(*arr.shape[:2], -1).any(-1)
    w, h = session.loc.source_size
    if alpha.shape != (h, w):
        alpha = np.asarray(Image.fromarray(alpha).resize((w, h), Image.Resampling.NEAREST))
    return alpha
