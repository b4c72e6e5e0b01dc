"""The torch.autograd.Function subclasses behind myext's ops.

Forward and backward call ops registered in the PyTorch dispatcher (the kernels of
one backend, see myext.backends), so ``torch.compile(fullgraph=True)`` traces them.
When a graph of the backward is asked for (``create_graph=True``), the backward ops
run inside Functions of their own whose formulas are built from torch ops (the fused
linear cross-entropy's backward then differentiates its reference), which makes
double (and higher) backward exact. Each op has two forms of its Function: the
plain one for reverse mode and torch.compile, and a ``...JvpFunction`` in the
``setup_context`` form with a jvp and a vmap rule, which the public functions use
under forward-mode AD and torch.func. Each is defined with the rest of its op in
myext/ops/<op>.py.
"""

from .ops.cross_entropy import (CrossEntropyBackwardFunction, CrossEntropyBackwardJvpFunction, CrossEntropyFunction,
                                CrossEntropyJvpFunction)
from .ops.linear_cross_entropy import LinearCrossEntropyFunction, LinearCrossEntropyJvpFunction
from .ops.linear_relu import (FusedLinearReLUFunction, FusedLinearReLUJvpFunction, LinearReLUBackwardFunction,
                              LinearReLUBackwardJvpFunction)

__all__ = ["CrossEntropyBackwardFunction", "CrossEntropyBackwardJvpFunction", "CrossEntropyFunction",
           "CrossEntropyJvpFunction", "FusedLinearReLUFunction", "FusedLinearReLUJvpFunction",
           "LinearCrossEntropyFunction", "LinearCrossEntropyJvpFunction", "LinearReLUBackwardFunction",
           "LinearReLUBackwardJvpFunction"]
