"""Plain-PyTorch reference implementations: the executable spec of every myext op.

Written from the formulas with elementary torch ops (no F.linear, no F.cross_entropy),
so that the tests compare each backend both against this and against
torch.nn.functional. Autograd differentiates them to any order. Each is defined with
the rest of its op in myext/ops/<op>.py (and is its spec's ``reference``).
"""

from .ops._losses import cross_entropy_2d
from .ops.cross_entropy import reference as cross_entropy
from .ops.linear_cross_entropy import reference as linear_cross_entropy
from .ops.linear_relu import reference as linear_relu

__all__ = ["cross_entropy", "cross_entropy_2d", "linear_cross_entropy", "linear_relu"]
