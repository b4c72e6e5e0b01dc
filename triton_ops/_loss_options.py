"""The scalar options of the losses, as the Triton host code carries them (the mirror of
csrc/loss_options.h). Their schemas give them as separate arguments, which each host
entry point gathers here once; its checks, the row helpers and the chunk loop then
take them whole, and only a kernel's launch unpacks them into the scalars a
``@triton.jit`` kernel takes. A new option is a field here, its schema argument, its
check, its math in each kernel and its launch: no helper's signature changes.

Imports nothing of myext (which has its own options value, myext/ops/_losses.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ._host import check


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The losses' options, as csrc/loss_options.h's struct. A dataclass, not a NamedTuple:
    LinearLossOptions adds a field to it, as LinearLossOptions does in C++."""

    reduction: int           # as at::Reduction: 0 none, 1 mean, 2 sum
    ignore_index: int        # a class-index target that adds nothing
    label_smoothing: float   # eps of q = (1 - eps) target + eps / C, in [0, 1]
    lse_square_scale: float  # lambda of the z-loss lambda lse^2; 0: none
    softcap: float           # logits capped at softcap tanh(x / softcap); 0: none
    temperature: float       # the capped logits divided by it; 1: none
    entropy: bool            # forward also writes each row's softmax entropy

    def check(self, op: str) -> None:
        """csrc/cross_entropy.h's check_cross_entropy_options, with its messages. Any
        ignore_index is valid."""
        check(self.reduction in (0, 1, 2), op,
              f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {self.reduction}")
        check(0.0 <= self.label_smoothing <= 1.0, op,
              f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        check(0.0 <= self.lse_square_scale < math.inf, op,
              f"lse_square_scale must be finite and >= 0, got {self.lse_square_scale}")
        check(0.0 <= self.softcap < math.inf, op,
              f"softcap must be finite and > 0, or 0 for none, got {self.softcap}")
        check(0.0 < self.temperature < math.inf, op,
              f"temperature must be finite and > 0, got {self.temperature}")

    @property
    def kernel_args(self) -> tuple:
        """The options among the kernels' arguments, in their order there (the reduction is
        the host's: the kernels write per-row values; entropy is a constexpr of forward's
        kernel alone)."""
        return self.ignore_index, self.label_smoothing, self.lse_square_scale, self.softcap, self.temperature

    @property
    def switches(self) -> dict:
        """The options whose neutral value (0; 1 for the temperature) compiles their math
        out of the kernels, by name, as the launch takes them to set the kernels' constexprs."""
        return dict(label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
                    softcap=self.softcap, temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class LinearLossOptions(LossOptions):
    """The losses' options, the linear ops' rows per chunk and the dtype of the weight
    gradient's sum over the chunks (csrc/linear_cross_entropy.h)."""

    chunk_size: int  # rows per chunk; 0: chosen from the shapes
    accum_dtype: Optional[torch.dtype] = None  # None: float32 for bfloat16 and float16 input

    def check(self, op: str) -> None:
        super().check(op)
        check(self.chunk_size >= 0, op,
              f"chunk_size must be >= 0 (0: chosen from the shapes), got {self.chunk_size}")
