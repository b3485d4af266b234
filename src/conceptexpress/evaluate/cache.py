"""On-disk caches of the evaluation inside each run folder, so a second ``evaluate`` redoes no expensive step.

Layout (``<key>`` = first 12 hex digits of the SHA-256 of the JSON key, which ``key.json`` / ``sam.json`` hold)::

    RUN/eval/generated-<key>/key.json                 base model, sampling options, token-file hashes
    RUN/eval/generated-<key>/concept_01/000.png …     "a photo of <c1>", image i from seed + i
    RUN/eval/generated-<key>/concept_01/prompt.json   prompt and how many images are finished (written last)
    RUN/eval/generated-<key>/all/000.png …            "a photo of <c1> and <c2> and …"
    RUN/eval/sam-<key>/concept_01.png …               the SAM mask kept for each concept (0 / 255)
    RUN/eval/sam-<key>/sam.json                       key, points, scores (written last)

The generation key holds what decides the pictures (base model, scheduler, steps, guidance, seed, the token files'
hashes), not the number of images: image i of a prompt always starts from seed + i (:mod:`conceptexpress.generate`), so
asking for more images later only generates the missing ones. Every file is written atomically; a folder whose
record is missing or disagrees with the request counts as empty.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.atomic import atomic_save_image, atomic_write_json, ensure_output_dir

__all__ = ["GeneratedCache", "cache_key", "read_sam_cache", "write_sam_cache"]

EVAL_DIR = "eval"

PROMPT_RECORD = "prompt.json"
SAM_RECORD = "sam.json"


def cache_key(key: dict[str, Any]) -> str:
    """12 hex digits identifying ``key`` (its canonical JSON)."""
    text = json.dumps(key, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _image_name(i: int) -> str:
    return f"{i:03d}.png"


class GeneratedCache:
    """The generated images of one run under one generation key (layout in the module docstring)."""

    def __init__(self, run_dir: Path, key: dict[str, Any]):
        self.key = key
        self.root = Path(run_dir) / EVAL_DIR / f"generated-{cache_key(key)}"

    def folder(self, name: str) -> Path:
        return self.root / name

    def available(self, name: str, prompt: str) -> int:
        """How many finished images of ``prompt`` the folder ``name`` holds (0 when its record is for another prompt)."""
        record = _read_json(self.folder(name) / PROMPT_RECORD)
        if not record or record.get("prompt") != prompt or not isinstance(record.get("count"), int):
            return 0
        count = record["count"]
        return count if all((self.folder(name) / _image_name(i)).is_file() for i in range(count)) else 0

    def paths(self, name: str, n: int) -> list[Path]:
        return [self.folder(name) / _image_name(i) for i in range(n)]

    def extend(self, name: str, prompt: str, start: int, images: list, extra: dict[str, Any]) -> None:
        """Write ``images`` as numbers ``start …``, then the record saying ``start + len(images)`` are finished."""
        folder = ensure_output_dir(self.folder(name))
        record_path = folder / PROMPT_RECORD
        if start == 0:
            record_path.unlink(missing_ok=True)  # until the new record lands nothing here counts as finished
        if not (self.root / "key.json").is_file():
            atomic_write_json(self.root / "key.json", self.key)
        for i, img in enumerate(images, start):
            atomic_save_image(img, folder / _image_name(i))
        count = start + len(images)
        atomic_write_json(record_path, {"prompt": prompt, "count": count, "images": [_image_name(i) for i in range(count)], **extra})


def read_sam_cache(folder: Path, key: dict[str, Any], n: int) -> list[dict[str, Any]] | None:
    """The cached SAM result of ``n`` concepts (each with its ``mask`` array) if ``folder`` holds it for ``key``."""
    record = _read_json(folder / SAM_RECORD)
    if not record or record.get("key") != key or len(record.get("concepts", [])) != n:
        return None
    out = []
    for entry in record["concepts"]:
        path = folder / str(entry.get("mask"))
        if not path.is_file():
            return None
        with Image.open(path) as im:
            out.append({**entry, "mask": np.asarray(im.convert("L")) > 127, "file": str(path)})
    return out


def write_sam_cache(folder: Path, key: dict[str, Any], concepts: list[dict[str, Any]]) -> None:
    """Write each concept's ``mask`` (bool array) as ``concept_NN.png``, then ``sam.json`` with the rest."""
    ensure_output_dir(folder)
    (folder / SAM_RECORD).unlink(missing_ok=True)
    entries = []
    for i, concept in enumerate(concepts):
        name = f"concept_{i + 1:02d}.png"
        atomic_save_image(Image.fromarray(concept["mask"].astype(np.uint8) * 255), folder / name)
        entries.append({**{k: v for k, v in concept.items() if k != "mask"}, "mask": name})
    atomic_write_json(folder / SAM_RECORD, {"key": key, "concepts": entries})
