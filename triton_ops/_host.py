"""Host-side helpers shared by the op modules. Imports torch only."""

from __future__ import annotations


from . import INTERPRETED

if INTERPRETED:
    def wrap_triton(kernel):
        """The kernel itself, launched directly: the interpreter runs it on CPU tensors,
        and torch 2.11 refuses interpreted kernels in torch.library.wrap_triton."""
        return kernel
else:
    # Eagerly it launches the kernel; traced (inside a triton_op) it records it, which is
    # how torch.compile sees the kernels of the ops registered as triton_ops.
    from torch.library import wrap_triton  # noqa: F401

