"""Compiles every Triton kernel variant of myext for sm_90 (Hopper) on a machine without a
GPU, and reports what the generated code uses: warp-group MMA (wgmma) in the GEMMs, TMA
(cp.async.bulk.tensor), the older mma.sync, and the shared memory it asks for (registers
and spills are known only once a device loads the code). Triton compiles for a
target without its device (its bundled ptxas): this checks code generation only, never
speed or results (scripts/gpu_check.sh runs the kernels on a GPU)::

    python scripts/triton_sm90_check.py    # exit status 1 if a GEMM of 4+ warps has no wgmma

Variants: the linear_relu forward GEMM (bias and ReLU) with each autotune config of each
target's list (Hopper's, and the pre-Hopper list, compiled for sm_90 too), in bfloat16,
float16 and float32 (TF32); its backward's masked-gradient pass (G stored, the
bias gradient's partial sums, or both); and the cross-entropy forward and backward kernels (class indices and probabilities, weights,
smoothing, the shard flag, the language-model options off and on) in bfloat16 and float32.

The GEMM and the backward pass are compiled as Triton's JIT specializes them for
contiguous operands whose sizes are multiples of 16 (4096^3, the MLP sizes): pointers
16-byte aligned, unit strides as the constant 1, the other sizes and strides divisible
by 16. Without that, 2-byte loads cannot be vectorized and the K loop is not pipelined
(its shared memory is one stage's), which is not what a GPU runs; the bfloat16 GEMM is
also compiled with generic strides (a transposed or odd-sized operand), where only wgmma
is checked. An aligned 16-bit GEMM whose shared memory is under num_stages - 1 stages
of tiles fails the check: its loads are not pipelined.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("triton_sm90_check: unset TRITON_INTERPRET: the interpreter compiles nothing")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import myext_triton_ops.cross_entropy as ce  # noqa: E402
import myext_triton_ops.linear_relu as lr  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# The most shared memory a block may take on an H100/H200 (227 KiB).
SM90_SHARED_BYTES = 227 * 1024
TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int64": "i64"}


def compile_variant(fn, pointer_types: dict[str, str], constexprs: dict, options: dict, divisible=()):
    """``fn`` compiled for sm_90: pointers typed by ``pointer_types`` (by argument name),
    arguments annotated tl.float64 as fp64, the rest i32; the arguments named in
    ``divisible`` known divisible by 16 (the JIT's specialization of aligned pointers and
    sizes; unit strides are passed as constexprs, as the JIT specializes them)."""
    params = {p.name: p for p in fn.params}
    signature = {}
    for name in fn.arg_names:
        if params[name].is_constexpr:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        elif "float64" in str(params[name].annotation):
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
    positions = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(ASTSource(fn, signature=signature, constexprs=positions, attrs=attrs), target=TARGET,
                          options=options)


def report(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    return {"wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
            "mma.sync": ptx.count("mma.sync"), "smem": kernel.metadata.shared}


# The forward GEMM's operands as linear_relu passes them for contiguous x (M, K), weight
# (N, K) read as B = weight^T (K, N), and output (M, N): unit strides, the rest aligned.
GEMM_UNIT_STRIDES = dict(stride_ak=1, stride_bk=1, stride_cn=1)
GEMM_DIVISIBLE = ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "M", "N", "K", "stride_am", "stride_bn", "stride_cm")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def gemm_variants():
    """(label, kernel, pointers, constexprs, options, divisible, stage_bytes): stage_bytes,
    the shared memory of one stage of A and B tiles, where pipelining is expected."""
    for target, configs in (("hopper", lr._HOPPER_CONFIGS), ("pre-hopper", lr._PRE_HOPPER_CONFIGS)):
        for dtype in ("bfloat16", "float16", "float32"):
            pointer = TRITON_TYPES[dtype]
            pointers = {name: pointer for name in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr")}
            precision = "tf32" if dtype == "float32" else "ieee"
            layouts = ("aligned", "generic") if dtype == "bfloat16" else ("aligned",)
            for config, layout in ((c, l) for c in configs for l in layouts):
                kw = config.kwargs
                constexprs = dict(HAS_BIAS=True, FP64=False, WIDEN=False, INPUT_PRECISION=precision, **kw)
                aligned = layout == "aligned"
                if aligned:
                    constexprs.update(GEMM_UNIT_STRIDES)
                stage_bytes = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * ELEMENT_BYTES[dtype]
                tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                label = (f"linear_relu GEMM {target} {dtype} {layout} {tile} s{config.num_stages} "
                         f"w{config.num_warps}")
                yield (label, lr._gemm_kernel, pointers, constexprs,
                       dict(num_warps=config.num_warps, num_stages=config.num_stages),
                       GEMM_DIVISIBLE if aligned else (),
                       stage_bytes if aligned and ELEMENT_BYTES[dtype] == 2 else None)


def relu_grad_variants():
    passes = {"G and bias": (True, True), "G only": (True, False), "bias only": (False, True)}
    for dtype in ("bfloat16", "float32"):
        pointer = TRITON_TYPES[dtype]
        pointers = dict(dy_ptr=pointer, y_ptr=pointer, g_ptr=pointer, partial_ptr="fp32")
        for pass_name, (store_g, bias_grad) in passes.items():
            constexprs = dict(STORE_G=store_g, BIAS_GRAD=bias_grad, FP64=False, stride_dyn=1, stride_yn=1,
                              **lr._RELU_GRAD_TILE)
            yield (f"linear_relu backward pass {dtype} {pass_name}", lr._relu_grad_kernel, pointers, constexprs,
                   dict(num_warps=4), ("dy_ptr", "y_ptr", "g_ptr", "partial_ptr", "M", "N", "stride_dym", "stride_ym"),
                   None)


def cross_entropy_variants():
    # Each kernel with the language-model options off (the default kernels) and all on
    # (per-row weights, temperature, the entropy and the extras' gradients).
    for dtype, prob, lm in itertools.product(("bfloat16", "float32"), (False, True), (False, True)):
        pointer = TRITON_TYPES[dtype]
        target = pointer if prob else "i64"
        flags = dict(PROB_TARGET=prob, HAS_WEIGHT=True, HAS_SAMPLE_WEIGHT=lm, SMOOTHING=True, Z_LOSS=True,
                     SOFTCAP=True, TEMPERATURE=lm, BLOCK_R=1, BLOCK_C=4096)
        forward_pointers = dict(x_ptr=pointer, target_ptr=target, weight_ptr=pointer, sample_weight_ptr="fp32",
                                loss_ptr="fp32", max_ptr="fp32", log_sum_ptr="fp32", target_logit_ptr="fp32",
                                row_weight_ptr="fp32", entropy_ptr="fp32")
        kind = ("prob" if prob else "class") + (" lm" if lm else "")
        yield (f"cross_entropy forward {dtype} {kind}", ce._cross_entropy_forward_kernel, forward_pointers,
               dict(**flags, ENTROPY=lm), dict(num_warps=8), (), None)
        backward_pointers = dict(grad_ptr=pointer, x_ptr=pointer, target_ptr=target, weight_ptr=pointer,
                                 sample_weight_ptr="fp32", max_ptr="fp32", log_sum_ptr="fp32", scale_ptr="fp32",
                                 row_weight_ptr="fp32", weight_sum_ptr="fp32", grad_logprob_ptr="fp32",
                                 grad_entropy_ptr="fp32", entropy_ptr="fp32")
        for shard in (False, True):
            yield (f"cross_entropy backward {dtype} {kind}{' shard' if shard else ''}",
                   ce._cross_entropy_backward_kernel, backward_pointers,
                   dict(**flags, SHARD=shard, GRAD_LOGPROB=lm and not prob, GRAD_ENTROPY=lm), dict(num_warps=8),
                   (), None)


def main() -> int:
    print(f"triton {triton.__version__}, target {TARGET}")
    print(f"{'variant':78} {'wgmma':>5} {'tma':>4} {'mma.sync':>8} {'smem bytes':>10}")
    failures = []
    variants = (*gemm_variants(), *relu_grad_variants(), *cross_entropy_variants())
    for label, fn, pointers, constexprs, options, divisible, stage_bytes in variants:
        try:
            found = report(compile_variant(fn, pointers, constexprs, options, divisible))
        except Exception as err:  # reported, and the run fails
            failures.append(f"{label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            print(f"{label:78} failed to compile")
            continue
        note = "  over sm_90's shared memory: the autotuner skips it" if found["smem"] > SM90_SHARED_BYTES else ""
        print(f"{label:78} {found['wgmma']:5} {found['tma']:4} {found['mma.sync']:8} {found['smem']:10}{note}")
        # A warp group is 4 warps: a GEMM of fewer cannot issue wgmma, and mma.sync is its due.
        if label.startswith("linear_relu GEMM") and options["num_warps"] >= 4 and found["wgmma"] == 0:
            failures.append(f"{label}: no wgmma")
        if stage_bytes is not None and found["smem"] < (options["num_stages"] - 1) * stage_bytes:
            failures.append(f"{label}: not pipelined ({found['smem']} bytes of shared memory)")
    if failures:
        print("\n".join(["", "triton_sm90_check: FAIL", *failures]))
        return 1
    print("\ntriton_sm90_check: PASS: every variant compiles for sm_90, every GEMM of 4+ warps with wgmma, "
          "every aligned 16-bit GEMM pipelined")
    return 0


if __name__ == "__main__":
    sys.exit(main())
