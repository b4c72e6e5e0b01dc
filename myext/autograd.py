"""The torch.autograd.Function subclasses behind myext's ops.

Forward and backward call ops registered in the PyTorch dispatcher (the kernels of
one backend, see myext.backends), so ``torch.compile(fullgraph=True)`` traces them.
When a graph of the backward is asked for (``create_graph=True``), the backward ops
run inside Functions of their own whose formulas are built from torch ops (the fused
linear cross-entropy's backward then differentiates its reference), which makes
double (and higher) backward exact. Each is defined with the rest of its op in
myext/ops/<op>.py.
"""

from .ops.cross_entropy import CrossEntropyBackwardFunction, CrossEntropyFunction
from .ops.linear_cross_entropy import LinearCrossEntropyFunction
from .ops.linear_relu import FusedLinearReLUFunction, LinearReLUBackwardFunction

__all__ = ["CrossEntropyBackwardFunction", "CrossEntropyFunction", "FusedLinearReLUFunction",
           "LinearCrossEntropyFunction", "LinearReLUBackwardFunction"]
