"""Plain-PyTorch reference implementations: the executable spec of every myext op.

Written from the formulas with elementary torch ops (no F.linear, no F.cross_entropy),
so that the tests compare each backend both against this and against
torch.nn.functional. Autograd differentiates them to any order.
"""

from __future__ import annotations

from typing import Optional

import torch


def linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(input @ weight.T + bias)."""
    pre = torch.matmul(input, weight.t())
    if bias is not None:
        pre = pre + bias
    return torch.clamp_min(pre, 0)


def cross_entropy_2d(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    """Cross-entropy of logits (R, C) against class indices (R,) or probabilities (R, C).

    With q the target distribution after label smoothing, q = (1 - eps) target + eps / C
    (target one-hot for class indices), and w the class weights (ones if none):
    loss_i = -sum_c w_c q_ic log_softmax(input)_ic. Rows whose class index is
    ignore_index count nothing. 'mean' divides by the summed weight of the target
    classes of the rows not ignored (class indices) or by R (probabilities).
    half-precision input is computed in float32 and the loss cast back.
    """
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):
        input = input.float()
        target = target.float() if target.is_floating_point() else target
        weight = weight.float() if weight is not None else None
    rows, classes = input.shape
    logp = input - torch.logsumexp(input, dim=1, keepdim=True)
    w = weight if weight is not None else torch.ones(classes, dtype=input.dtype, device=input.device)
    eps = label_smoothing

    if target.is_floating_point():
        q = target * (1.0 - eps) + eps / classes
        losses = -(logp * q * w).sum(dim=1)
        denominator = torch.tensor(float(rows), dtype=input.dtype, device=input.device)
    else:
        kept = target != ignore_index
        safe_target = torch.where(kept, target, torch.zeros_like(target))
        w_target = w[safe_target] * kept
        nll = -logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        smooth = -(logp * w).sum(dim=1) / classes
        losses = torch.where(kept, (1.0 - eps) * w_target * nll + eps * smooth, 0.0)
        denominator = w_target.sum()

    if reduction == "none":
        loss = losses
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() / denominator
    return loss.to(out_dtype)
