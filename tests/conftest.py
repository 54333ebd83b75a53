import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels are tested through Triton's interpreter, which must be chosen
# before anything imports triton (its standard library is compiled for one mode or the other, and
# frameworks the integration tests import may load it first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
