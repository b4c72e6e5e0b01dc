"""myext: fused Linear+ReLU and cross-entropy ops for PyTorch.

Each op has C++ (CPU), CUDA and Triton kernels behind one ``torch.autograd.Function``,
registered in the PyTorch dispatcher under ``torch.ops.myext``, and a plain-PyTorch
reference (``backend="torch"``) that every kernel is tested against.
"""

import os

import torch  # loads libtorch before the extension

from . import _C  # noqa: F401  (registers the myext:: ops and their kernels)
from . import _library
from . import autograd, backends, reference
from .backends import available_backends
from .functional import cross_entropy, linear_relu
from . import models, nn
from .fuse import fuse

_library.register("")
_library.register_inplace()

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    backends.probe_triton()

__all__ = ["autograd", "available_backends", "cross_entropy", "fuse", "linear_relu", "models", "nn", "reference"]
__version__ = "0.1.0"
