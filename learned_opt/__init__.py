"""learned_opt: a drop-in PyTorch optimizer whose update rule is a small meta-trained network.

    from learned_opt import LearnedOptimizer
    opt = LearnedOptimizer(model.parameters())      # instead of torch.optim.Adam(...)
"""

from .config import ArchConfig
from .functional import init_state, lopt_step, observe_validation_loss
from .network import MetaNetwork
from .optimizer import LearnedOptimizer, observe_loss
from .weights import (DEFAULT_WEIGHTS, WeightsError, available_weights, load_weights,
                      save_weights)

__all__ = [
    "ArchConfig", "DEFAULT_WEIGHTS", "LearnedOptimizer", "MetaNetwork", "WeightsError",
    "available_weights", "init_state", "load_weights", "lopt_step", "observe_loss", "observe_validation_loss",
    "save_weights",
]
__version__ = "0.1.0"
