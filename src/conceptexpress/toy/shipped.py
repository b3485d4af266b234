"""The trained toy pipeline shipped with the package (fp16 safetensors, loads offline in seconds)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def toy_pipeline_path() -> Path:
    """Folder of the shipped toy Stable Diffusion: ``load_pipeline(toy_pipeline_path())``.

    Raises:
        ModelLoadError: the weights are not installed (a source checkout without them).
    """
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            f"the toy model is not installed at '{WEIGHTS_DIR}'; train one with "
            "`python -m conceptexpress.toy train OUT` and pass OUT/step-N as the model"
        )
    return WEIGHTS_DIR


def export_fp16(trained: str | Path, dest: str | Path = WEIGHTS_DIR) -> Path:
    """Write the trained pipeline folder ``trained`` to ``dest`` as fp16 safetensors (the shipped form)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ..models.loading import dtype_kwargs

    pipe = StableDiffusionPipeline.from_pretrained(trained, safety_checker=None, requires_safety_checker=False,
                                                   **dtype_kwargs(torch.float16))
    pipe.save_pretrained(dest, safe_serialization=True)
    return Path(dest)
