"""Times myext's cuda and triton backends against PyTorch eager on a GPU; prints one table.

Run by scripts/gpu_check.sh. Each time is the median of CUDA-event timings after warm-up.
GB/s counts the bytes an op must move at least (cross-entropy: one read of the logits
forward; forward+backward two reads and a write), to read against the GPU's memory
bandwidth; linear_relu is bound by arithmetic instead, so it gets TFLOP/s.
"""

from __future__ import annotations

import functools
import itertools
import statistics

import torch
import torch.nn.functional as F

import myext

WARMUP = 5
ITERATIONS = 20


def median_ms(fn) -> float:
    for _ in range(WARMUP):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(ITERATIONS)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def timed(fn, args, backward, grad=None):
    """A closure running fn(*args), and with backward=True its backward to the args
    that require grad."""
    if not backward:
        return lambda: fn(*args)
    wrt = [t for t in args if t.requires_grad]
    return lambda: torch.autograd.grad(fn(*args), wrt, grad)


def linear_relu_cases():
    # (rows, in_features, out_features, dtype): a large square GEMM, and SimpleNet's fc1.
    for rows, k, n, dtype in ((4096, 4096, 4096, torch.bfloat16), (256, 784, 128, torch.float32)):
        x = torch.randn(rows, k, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype).requires_grad_()
        b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, n, device="cuda", dtype=dtype)
        for pass_, gemms in (("fwd", 1), ("fwd+bwd", 3)):
            backward = pass_ == "fwd+bwd"
            yield dict(op="linear_relu", shape=f"{rows}x{k}->{n}", dtype=dtype, pass_=pass_,
                       torch=timed(lambda x, w, b: F.relu(F.linear(x, w, b)), (x, w, b), backward, grad),
                       ours=lambda backend, args=(x, w, b), backward=backward, grad=grad: timed(
                           functools.partial(myext.linear_relu, backend=backend), args, backward, grad),
                       flop=gemms * 2 * rows * k * n, bytes=None)


def cross_entropy_cases():
    rows = 4096
    for classes in (32000, 128256):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, classes, device="cuda", dtype=dtype, requires_grad=True)
            target = torch.randint(0, classes, (rows,), device="cuda")
            for pass_, sweeps in (("fwd", 1), ("fwd+bwd", 3)):
                backward = pass_ == "fwd+bwd"
                yield dict(op="cross_entropy", shape=f"{rows}x{classes}", dtype=dtype, pass_=pass_,
                           torch=timed(F.cross_entropy, (x, target), backward),
                           ours=lambda backend, args=(x, target), backward=backward: timed(
                               functools.partial(myext.cross_entropy, backend=backend), args, backward),
                           flop=None, bytes=sweeps * x.numel() * x.element_size())


def main() -> None:
    backends = [b for b in ("cuda", "triton") if b in myext.available_backends("cuda")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backends {backends}")
    header = f"{'op':<14}{'shape':<18}{'dtype':<10}{'pass':<9}{'backend':<8}" \
             f"{'ms':>9}{'torch ms':>10}{'speed-up':>10}{'GB/s':>8}{'TFLOP/s':>9}"
    print(header)
    print("-" * len(header))
    # Lazily, so that no more than two cases' tensors are alive at once.
    for case in itertools.chain(linear_relu_cases(), cross_entropy_cases()):
        torch_ms = median_ms(case["torch"])
        for backend in backends:
            ms = median_ms(case["ours"](backend))
            gbs = f"{case['bytes'] / ms / 1e6:.0f}" if case["bytes"] else "-"
            tflops = f"{case['flop'] / ms / 1e9:.1f}" if case["flop"] else "-"
            dtype = str(case["dtype"]).replace("torch.", "")
            print(f"{case['op']:<14}{case['shape']:<18}{dtype:<10}{case['pass_']:<9}{backend:<8}"
                  f"{ms:>9.3f}{torch_ms:>10.3f}{torch_ms / ms:>9.2f}x{gbs:>8}{tflops:>9}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
