"""The methods ConceptExpress is compared with, in one place (paper §4.1, Table 1/3, Fig. 8).

Token learning (imported by ``extract``'s ``--method``):

* :mod:`~conceptexpress.baselines.bas` — Break-A-Scene's token phase: BaS† (our masks, random init) and the
  supervised ``bas`` (user masks and/or initializer words);
* :mod:`~conceptexpress.baselines.bas_ft` — Break-A-Scene's phase 2 (UNet + text encoder), ``--method bas-ft``.

Localization (the columns of ``bench-localize``, paper Table 3):

* :mod:`~conceptexpress.baselines.clustering` — k-means@k and FINCH@k on the same self-attention;
* :mod:`~conceptexpress.baselines.maskcut` — CutLER's training-free MaskCut on DINO features.

Nothing is imported here: each module pulls its own dependencies (diffusers, scikit-learn, transformers).
"""
