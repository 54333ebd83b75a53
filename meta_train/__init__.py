"""meta_train: outer-training of learned optimizers, and MAML-family baselines.

Not built yet: see the project's open issues. The package exists so that the distribution
layout is final; it exposes nothing.
"""
