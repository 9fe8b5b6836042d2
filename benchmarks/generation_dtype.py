"""Generation speed on CPU: float32 against bfloat16, measured in one process.

    python benchmarks/generation_dtype.py [--model NAME] [--prompts 8] [--new-tokens 32] [--repeats 3]
        [--batch-size 8] [--cpu-isa avx2]

What `steer` and the transformers generator of `synthesize` do: greedy ``model.generate`` of --new-tokens tokens
(min = max, so every run decodes the same number of steps) for --prompts short chat prompts, left-padded in
batches of --batch-size, through ``TransformersGenerator`` on the embedded SmolLM2-135M-Instruct (or --model). The
two dtypes run interleaved over --repeats rounds after one warm-up each, and the fastest round is kept (the CPUs
may be shared: the 1-minute load average is printed). The ratio is bfloat16 seconds over float32 seconds
(> 1: float32 is faster).

``--cpu-isa avx2`` reruns the same measurement in a child process with ``ATEN_CPU_CAPABILITY=avx2`` and
``ONEDNN_MAX_CPU_ISA=AVX2``: torch's own kernels and oneDNN then use no AVX-512/AMX instructions, which stands in
for a CPU without native bf16 (an emulation on the same machine, not a second CPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

PROMPTS = [
    "Tell me about your weekend.", "How do I bake bread at home?", "What is the capital of France?",
    "Write a short poem about the sea.", "Give me three tips for learning a language.",
    "Why is the sky blue?", "Describe your favourite book.", "How does a bicycle work?",
    "What should I cook for dinner tonight?", "Explain photosynthesis simply.",
]


def run(args) -> None:
    from safetyscope import Backbone
    from safetyscope.backbone import cpu_has_native_bf16
    from safetyscope.cli.options import quiet_libraries
    from safetyscope.generators import TransformersGenerator

    quiet_libraries()  # no loading bars between the timing lines

    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, native bf16 flag: "
          f"{cpu_has_native_bf16()}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}; load average (1 min) "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    gens = {}
    for dt in ("float32", "bfloat16"):
        bb = Backbone.from_pretrained(args.model, device="cpu", dtype=dt)
        gens[dt] = TransformersGenerator.from_backbone(bb, args.batch_size)
    texts = [gens["float32"]._render([{"role": "user", "content": p}]) for p in prompts]

    def once(gen) -> tuple[float, list[str]]:
        t = time.perf_counter()
        outs = gen.generate_texts(texts, 1, 0.0, args.new_tokens, 0, add_special_tokens=False)
        return time.perf_counter() - t, [o[0] for o in outs]

    times: dict[str, list[float]] = {dt: [] for dt in gens}
    same = None
    for dt, gen in gens.items():  # warm-up: first-call allocations and kernel selection
        once(gen)
    for _ in range(args.repeats):
        outs = {}
        for dt, gen in gens.items():
            s, outs[dt] = once(gen)
            times[dt].append(s)
        same = sum(a == b for a, b in zip(outs["float32"], outs["bfloat16"]))
    best = {dt: min(v) for dt, v in times.items()}
    n_tok = args.prompts * args.new_tokens
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, batch {args.batch_size}, best of {args.repeats} "
          f"(load average now {os.getloadavg()[0]:.1f})")
    for dt, s in best.items():
        rounds = ", ".join(f"{x:.2f}" for x in times[dt])
        print(f"  {dt:9s} {s:7.2f} s  {n_tok / s:7.1f} tokens/s   (rounds: {rounds})")
    print(f"  bfloat16 / float32 time: {best['bfloat16'] / best['float32']:.2f}x; identical greedy completions: "
          f"{same}/{args.prompts}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cpu-isa", choices=["avx2"], default=None,
                   help="Also measure in a child process limited to AVX2 kernels (no AVX-512/AMX).")
    args = p.parse_args()
    run(args)
    if args.cpu_isa:
        print(f"\n-- same measurement, kernels limited to {args.cpu_isa} --", flush=True)
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
        child = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "cpu_isa" and v is not None]
        subprocess.run([sys.executable, __file__, *child], env=env, check=True)


if __name__ == "__main__":
    main()
