"""One training step of a small Llama-style language model, five ways: eager,
``torch.compile``, ``torch.compile`` with Inductor's auto-chunker, ``torch.compile`` with
``backend="myext"``, and the Hugging Face integration (``fuse_causal_lm``, eager).

    python benchmarks/bench_lm_step.py                  # hidden 512, 4 layers, vocabulary 32000, 4 x 512 tokens
    python benchmarks/bench_lm_step.py --only eager myext-compile --steps 5

Each provider runs in a process of its own (so that one's caches and compiled code
never serve another), builds the same seeded ``LlamaForCausalLM`` (float32, eager
attention), takes warm-up steps (compilation happens there), then the timed steps:
the loss of ``model(input_ids, labels=labels)`` and its backward into the parameters'
gradients, which exist from the warm-up on. Reported: the median step, and the peak
growth of the resident set (VmHWM) over one step: what the step holds beyond the
model, its gradients and its inputs, beside the size of the float32 logits it would
make; and the same for the trunk alone (``trunk``, ``trunk-compile``: the model without its head,
a plain loss of the last hidden states), whose peak the head's memory adds to. Ratios compare
within one run; processes run one at a time, in the order given,
and again in reverse with ``--rounds 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

PROVIDERS = ("eager", "compile", "compile-autochunk", "myext-compile", "myext-hf")
# References, not providers: the same step without the head, its loss a plain function
# of the last hidden states, eager and compiled. What a provider holds beyond its trunk's
# peak is what its head and loss hold.
TRUNKS = ("trunk", "trunk-compile")


def build(args: argparse.Namespace):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    return model, ids


def step_of(provider: str, model, ids: torch.Tensor):
    """The provider's training step: loss, backward."""
    def loss(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    if provider in TRUNKS:
        def loss(input_ids, labels):
            return model.model(input_ids=input_ids).last_hidden_state.square().mean()

        if provider == "trunk-compile":
            loss = torch.compile(loss)
    elif provider == "compile":
        loss = torch.compile(loss)
    elif provider == "compile-autochunk":
        # The threshold lowered as benchmarks/bench_linear_cross_entropy.py does, for the
        # same reason: at its default the chunker leaves a language model's head whole.
        loss = torch.compile(loss, options={"auto_chunker.enable": True, "auto_chunker.amplify_ratio_threshold": 1})
    elif provider == "myext-compile":
        loss = torch.compile(loss, backend="myext")
    elif provider == "myext-hf":
        from myext.integrations.transformers import fuse_causal_lm

        fuse_causal_lm(model)
    elif provider != "eager":
        raise ValueError(f"unknown provider {provider!r}")

    def step() -> float:
        value = loss(ids, ids)
        value.backward()
        return value.item()

    return step


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def child(args: argparse.Namespace) -> None:
    model, ids = build(args)
    step = step_of(args.child, model, ids)
    for _ in range(args.warmup):
        step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) from here on
    before = _status_bytes("VmRSS")
    loss = step()
    peak = _status_bytes("VmHWM") - before
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    report = {"loss": loss, "seconds": statistics.median(times), "peak_bytes": peak}
    if args.child == "myext-compile":
        import myext.compiler

        report["fusions"] = [str(f) for r in myext.compiler.reports() for f in r.fusions]
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=PROVIDERS + TRUNKS, default=list(PROVIDERS + TRUNKS))
    parser.add_argument("--child", choices=PROVIDERS + TRUNKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from myext import machine

    logits = args.batch * args.seq * args.vocab * 4
    print(machine.cpu_description())
    print(f"Llama-style: hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
          f"{args.batch} x {args.seq} tokens, float32; logits {logits / 2**20:.0f} MiB; torch {torch.__version__}")
    results: dict[str, list[dict]] = {p: [] for p in args.only}
    for r in range(args.rounds):
        for provider in (args.only if r % 2 == 0 else args.only[::-1]):
            command = [sys.executable, __file__, "--child", provider] + [
                f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "seq", "warmup", "steps")]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[provider].append(json.loads(out.strip().splitlines()[-1]))
    base = statistics.median(x["seconds"] for x in results.get("compile", results[args.only[0]]))
    print(f"{'provider':<18} {'loss':>9} {'median s':>9} {'x compile':>9} {'peak growth':>12}")
    for provider, runs in results.items():
        seconds = statistics.median(x["seconds"] for x in runs)
        peak = max(x["peak_bytes"] for x in runs)
        loss = "-" if provider in TRUNKS else f"{runs[0]['loss']:.5f}"
        print(f"{provider:<18} {loss:>9} {seconds:>9.3f} {base / seconds:>9.2f} {peak / 2**20:>8.0f} MiB")
        for fusion in runs[0].get("fusions", []):
            print(f"    {fusion}")


if __name__ == "__main__":
    main()
