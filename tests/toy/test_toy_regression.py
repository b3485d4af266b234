"""Regression tests on the shipped, trained toy model (issue 7): the method finds and regenerates objects.

Thresholds come from `benchmarks/toy_quality.py` on the shipped weights with a margin (docs/toy-world.md; the breaks
and figures per model: benchmarks/results/toy/HISTORY.md); each test was seen to fail on a deliberate break
(transposed masks, zero token gradients).
"""

from __future__ import annotations

from collections import Counter

import pytest

from conceptexpress.config import RunConfig, TrainConfig
from conceptexpress.toy import read_objects, render_scene, toy_pipeline_path
from conceptexpress.toy.world import caption_objects

# Held-out scenes (seeds < 1e6 are never trained on) with 1, 2, 3 and 4 objects.
SCENES = [(900, 1), (901, 1), (902, 2), (903, 2), (904, 3), (905, 4)]
# Measured on the shipped weights (run15, step 3000, the upright world; CPU, one thread): 0.498 on the two 1-object
# scenes, 0.608 on the four others; with the masks transposed (a deliberate break in `localizer.py`): 0.311 and 0.204.
# (Run10's weights: 0.498 / 0.606, transposed 0.288 / 0.209; run7's, rotated world: 0.467 / 0.644, transposed
# 0.258 / 0.212; run3's: 0.486 / 0.176; run1's: 0.607 / 0.217.)
MIN_IOU_SINGLE = 0.4
MIN_IOU_MULTI = 0.5


@pytest.fixture(scope="module")
def toy_pipe():
    import torch

    from conceptexpress.models import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = load_pipeline(toy_pipeline_path(), device="cpu")  # a Path, as the issue and the docstring say
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def test_shipped_weights_are_small_fp16_and_load_offline(toy_pipe):
    files = list(toy_pipeline_path().rglob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 10 * 2**20
    from safetensors import safe_open

    with safe_open(str(toy_pipeline_path() / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        names = f.keys()
        assert {str(f.get_slice(k).get_dtype()) for k in names} == {"F16"}
    assert toy_pipe.unet.config.sample_size == 32


def test_localization_finds_the_objects(toy_pipe):
    from conceptexpress.attention.localizer import localize_concepts
    from conceptexpress.locbench.matching import aggregate, match_masks

    single, multi = [], []
    for seed, k in SCENES:
        scene = render_scene(seed, num_objects=k)
        loc = localize_concepts(scene.image, toy_pipe)
        (single if k == 1 else multi).append(match_masks(loc.masks, scene.masks))
    assert aggregate(single).iou >= MIN_IOU_SINGLE
    assert aggregate(multi).iou >= MIN_IOU_MULTI


def test_caption_names_the_object(toy_pipe):
    from conceptexpress.generate import GenerateConfig, generate

    prompts = ["a photo of a red circle", "a photo of a blue square", "a photo of a yellow triangle",
               "a photo of a green circle"]
    images = generate(toy_pipe, prompts, GenerateConfig(n=2, steps=25))
    reads = [[read_objects(img) for img in imgs] for imgs in images]
    named = [caption_objects(prompt)[0] for prompt in prompts]  # (colour, shape) each prompt names
    # The named colour is the most frequent one read: 4 of 4 prompts on run15's and run10's weights (3 of 4 on run7's:
    # the red circle drawn yellow; run3: red ties with yellow); every prompt replaced by "a photo of a green square"
    # (a deliberate break): 1 of 4 on run15's and run3's weights.
    right = 0
    for (colour, _), read in zip(named, reads):
        seen = Counter(c for objects in read for c, _ in objects)
        right += seen[colour] > max((n for c, n in seen.items() if c != colour), default=0)
    assert right >= 3
    # The named object itself — its colour and its shape — is among the objects read: 8 of 8 images on run15's
    # weights (the caption contrast's shape binding), 4 of 8 on run10's (no red circle, no blue square: run10's weights
    # fail this), 0 of 8 with every prompt "a photo of a green square".
    shown = sum(obj in objects for obj, read in zip(named, reads) for objects in read)
    assert shown >= 6, reads


def _latent_targets(scene):
    """Ground-truth latent masks m_i (N, 32, 32) and centroids f_i = the mask as a distribution (N, 32·32)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    frac = F.adaptive_avg_pool2d(torch.from_numpy(scene.masks.astype(np.float32))[:, None], 32)[:, 0]
    return frac > 0.5, (frac / frac.sum((1, 2), keepdim=True)).flatten(1)


# Eq. 11 on learned attention: a token whose embedding is the object's colour word attends to that object, so the
# EMD between its cross-attention and the concept's centroid is small for the right concept and large for the other.
# Measured on the shipped weights (mean over 3 scenes × 2 steps): right / swapped = 0.407 unflipped, 0.361 flipped
# (run10's weights: 0.336 / 0.324; run7's: 0.398 / 0.357; run3's: 0.369 / 0.401; run1's: 0.375 / 0.430).
# Deliberate breaks: EMD target transposed in `TokenTrainer._emd_targets` → 0.800 / 1.140 on run15's weights (run10's:
# 0.853 / 1.081; run3's: 0.904 / 1.107); target not flipped with the image → 0.992 (flipped case, run3 weights).
# (Run1's: 0.893 / 1.186; 1.036.)
EMD_SCENES = (910, 911, 913)
MAX_EMD_RATIO = 0.6


@pytest.mark.parametrize("flip_p", [0.0, 1.0], ids=["unflipped", "flipped"])
def test_emd_regularizer_is_aligned_with_learned_attention(toy_pipe, flip_p):
    import numpy as np

    from conceptexpress.config import TrainConfig
    from conceptexpress.learn.trainer import TokenTrainer

    words = toy_pipe.text_encoder.get_input_embeddings().weight.detach()
    reg = {"right": [], "swapped": []}
    for seed in EMD_SCENES:
        scene = render_scene(seed, num_objects=2)
        masks, centroids = _latent_targets(scene)
        for mode in reg:
            cfg = TrainConfig(steps=2, merge_step=100, lr=1e-12, split_merge=False, flip_p=flip_p, seed=0)
            trainer = TokenTrainer(toy_pipe, scene.image, scene.image.size, masks, centroids, cfg)
            for i in range(2):  # token i = the colour word of object i (right) or of the other object (swapped)
                colour = scene.objects[i if mode == "right" else 1 - i][0]
                trainer.vectors.data[i] = words[toy_pipe.tokenizer(colour, add_special_tokens=False).input_ids[0]]
            reg[mode] += [h["reg"] for h in trainer.train().history]
    right, swapped = float(np.mean(reg["right"])), float(np.mean(reg["swapped"]))
    print(f"EMD right {right:.3f} swapped {swapped:.3f} ratio {right / swapped:.3f}")
    assert right < MAX_EMD_RATIO * swapped, (right, swapped)


# One short extraction regenerates its object (issue 7 item 4). `benchmarks/toy_quality.py --sections recover
# --steps 60 --merge-step 12 --recover-scenes 16` on the shipped run15 weights (one-object scenes 920–935;
# docs/toy-world.md): the concept matching the object best shows the whole object in >= 3 of 4 samples for 10 of 16
# scenes and its colour for 10 of 16, against 0 and 0 of 16 with the learning rate at 1e-12. Scene 929 (a yellow
# square): learned 4 of 4 samples show the yellow square, 1 of 4 with the token gradients zeroed (`per_prompt.zero_()`
# after `_token_gradients`, a deliberate break) and in the 1e-12 control. (run10's and run7's weights used scene 933,
# a blue circle, 4 of 4 against 0 of 4 — 3 of 4 on run15's, on the test's edge; run3's scene 927.)
RECOVER_SCENE = 929
RECOVER_LR = TrainConfig.lr * 500 / 60  # the paper's total step size (500 steps at 5e-4) over 60 steps


def test_short_extraction_regenerates_its_object(toy_pipe, tmp_path):
    """extract without samples, then the concept on the object drawn 4 times from the run folder (generate_from_run,
    the user's path): the same pictures extract's own samples would be (seed + i per image; checked equal), without
    drawing every other concept too."""
    import numpy as np
    from PIL import Image

    from conceptexpress.config import GenerateConfig, ModelConfig, SampleConfig
    from conceptexpress.extract import extract
    from conceptexpress.generate import generate_from_run, prompt_folders

    scene = render_scene(RECOVER_SCENE, num_objects=1)
    src = tmp_path / "scene.png"
    scene.image.save(src)
    cfg = TrainConfig(steps=60, merge_step=12, lr=RECOVER_LR, micro_batch=0, checkpoint_every=0)
    manifest = extract(src, tmp_path / "run", RunConfig(model=ModelConfig(model=str(toy_pipeline_path())), train=cfg, sample=SampleConfig(samples=False), progress=False), pipe=toy_pipe)
    masks = [np.asarray(Image.open(tmp_path / "run" / t["mask"])) > 127 for t in manifest["tokens"]]
    ious = [(m & scene.masks[0]).sum() / (m | scene.masks[0]).sum() for m in masks]
    prompt = f"a photo of {manifest['tokens'][int(np.argmax(ious))]['token']}"
    root = generate_from_run(tmp_path / "run", [prompt], GenerateConfig(n=4, seed=cfg.seed, steps=25), pipe=toy_pipe)
    read = [read_objects(Image.open(f)) for f in sorted(prompt_folders(root, [prompt])[0].glob("[0-9]*.png"))]
    assert len(read) == 4
    assert sum(scene.objects[0] in objects for objects in read) >= 3, (scene.objects[0], read)
