"""myext's ops, one module each: importing a module registers its op (see myext.registry).

A new op is a new module here (and its kernels in csrc/ and triton_ops/), listed below.
"""

from . import linear_relu, cross_entropy, linear_cross_entropy  # noqa: F401  (registers each op's spec)
