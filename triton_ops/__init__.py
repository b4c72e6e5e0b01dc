"""Triton kernels behind myext's ``backend="triton"``: the package ``myext_triton_ops``.

The folder ``triton_ops/`` installs under that name, the project's own rather than the
generic ``triton_ops`` (setup.py maps the name to the folder); in a checkout, the link
``myext_triton_ops`` beside the folder lets it be imported in place
(``PYTHONPATH=<checkout>``).

One module per op, ``triton_ops/<op>.py``: its ``@triton.jit`` kernels and, for each of
the op's ``myext::`` dispatcher ops, a host function of the same name that checks its
arguments and launches the kernels. The package depends on torch and triton only:
myext registers the host functions as the ops ``myext::<name>_triton`` (with the
schemas of their C++ counterparts, see myext/_library.py), never the reverse, so
this package may be imported before or after myext.

Importing the package itself imports nothing but the standard library;
``myext_triton_ops.<op>`` imports torch and triton.
"""

import os

# Read once, here, as Triton reads it when it is first imported: whether kernels run
# through Triton's CPU interpreter (CPU tensors) instead of being compiled for a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
