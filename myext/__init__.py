"""myext: fused Linear+ReLU, cross-entropy and linear cross-entropy ops for PyTorch.

Each op has C++ (CPU), CUDA and Triton kernels behind one ``torch.autograd.Function``,
registered in the PyTorch dispatcher under ``torch.ops.myext``, and a plain-PyTorch
reference (``backend="torch"``) that every kernel is tested against.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the myext:: ops, and the CUDA kernels of a CUDA build)
from . import _cpu  # noqa: F401  (registers the CPU kernels built for this CPU's vector ISA)
from . import ops  # noqa: F401  (registers each op: its spec, fake kernels)
from . import autograd, backends, reference, registry, testing
from .backends import available_backends
from .functional import CrossEntropyOutput, cross_entropy, linear_cross_entropy, linear_relu
from . import models, nn
from .fuse import fuse

# Backends are probed when first asked, not here (see myext.backends).

__all__ = ["CrossEntropyOutput", "autograd", "available_backends", "backends", "cross_entropy", "fuse",
           "linear_cross_entropy", "linear_relu", "models", "nn", "reference", "registry", "testing"]
__version__ = "0.1.0"
