"""Token learning (paper §3.3–3.4): split-and-merge tokens trained with masked denoising, contrastive and EMD losses.

The losses live in :mod:`conceptexpress.learn.losses` as pure functions on tensors (no diffusers import).
"""
