"""meta_train: outer-training of learned optimizers, and MAML-family baselines.

* ``python -m meta_train train|eval|plot|families``: meta-train learned-optimizer weights with
  truncated ES or PES on task families (``meta_train.tasks``), one process or several
  (``--workers``, or ``torchrun``); see docs/meta-training.md.
* ``python -m meta_train.fewshot``: MAML, MAML++ and iMAML few-shot learners on the
  sinusoid and Omniglot benchmarks; see docs/fewshot.md.
"""
