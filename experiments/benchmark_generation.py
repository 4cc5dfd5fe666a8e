r"""
---
title: Benchmark of cached generation
summary: Tokens per second of AutoregressiveModel.generate for the Feedback Transformers (and the parallel
  baseline when available), against re-running the whole prefix for every token.
---

# Benchmark: generating text

```
python experiments/benchmark_generation.py                      # the issue's configuration
python experiments/benchmark_generation.py --batch 1 --repeats 3 --full-tokens 64
python experiments/benchmark_generation.py --variants weighted kv --batch 1 --compile --compare-eager \
    --full-tokens 0 --growth-tokens 0                   # compiled against eager cached generation
```

`--compile` builds the feedback models with `compile=True` (`labml_nn/transformers/feedback/compiled.py`;
`--compile reduce-overhead` for CUDA graphs); the compile itself happens in the warm-up run and is reported apart
(`compile_s`, the seconds of the first generation, compiling from scratch: inductor's on-disk cache goes to a new
folder unless `--warm-cache`). `--compare-eager` also measures the same model eagerly, in the
same run, the two taking turns repeat by repeat, and reports both and their ratio.

Three measurements, on randomly initialised models (speed does not depend on the weights):

* **cached**: `generate(prompt, tokens)`: the prompt once, then one step per new token from the cached state.
  Median over `--repeats` runs, after one warm-up run.
* **full re-computation**: what labml_nn's sampling does, `model(sequence so far)` for every new token. For a
  Feedback Transformer token $T$ costs $T$ sequential steps, so $N$ tokens cost $O(N^2)$; it runs once
  (`--full-repeats`), over `--full-tokens` new tokens.
* **growth**: one generation of `--growth-tokens` tokens at batch 1, timing every step with a forward hook;
  tokens/s of the first and of the last `--growth-window` generated tokens. The only per-token work that
  should grow with the position is the attention over the memory (one dot product per memory slot), so the
  ratio shows how much the position costs.

tokens/s counts every sequence of the batch: batch $\times$ new tokens / seconds. The prompt (`--prompt-len`
tokens) is part of the timed call. Each run samples at temperature 1 with a seeded `torch.Generator`.
The last line of the output is the whole result as JSON.

Seconds are wall-clock time by default. On a machine shared with other jobs, wall-clock time of small
multi-threaded operations is erratic (a thread waits for a core); `--clock cpu --threads 1` measures the CPU
time of the benchmark's own thread instead, which other jobs barely disturb.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.benchmark import compile_cache  # noqa: E402
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel, sample_token  # noqa: E402
from labml_nn.transformers.feedback.build import ModelConfig, build_model  # noqa: E402

VARIANTS = {"weighted": "FeedbackTransformer", "kv": "FeedbackTransformerKV",
            "baseline": "CausalTransformer (KV cache)"}
# The experiment's name of each variant's model
MODEL_NAMES = {"weighted": "feedback_transformer", "kv": "feedback_transformer_kv", "baseline": "transformer"}


def build_variant(variant: str, args: argparse.Namespace, compile: Optional[str] = None) -> AutoregressiveModel:
    """
    A randomly initialised language model of the benchmark's size (dropout 0.1, so eval mode matters), its
    inference step compiled with `compile` (a `torch.compile` mode; feedback models only).
    """
    config = ModelConfig(MODEL_NAMES[variant], n_vocab=args.vocab, d_model=args.d_model, heads=args.heads,
                         d_ff=args.d_ff, n_layers=args.n_layers, dropout=0.1,
                         compile=compile if variant != 'baseline' else False)
    return build_model(config, torch.device(args.device)).eval()


def full_recomputation(model: nn.Module, prompt: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Sampling without a state: run the model over the whole sequence so far for every new token."""
    seq = prompt
    with torch.inference_mode():
        for _ in range(n):
            token = sample_token(model(seq)[-1], 1.0, None, generator)
            seq = torch.cat([seq, token[None]])
    return seq


# `time.perf_counter` (wall clock) or `time.thread_time` (CPU time of this thread), set by `--clock`
clock = time.perf_counter


def seconds(fn: Callable[..., object], *args, **kwargs) -> float:
    """Seconds of `fn(*args, **kwargs)` by `clock`."""
    start = clock()
    fn(*args, **kwargs)
    if torch.cuda.is_initialized():
        # A GPU runs behind the Python that launches its work
        torch.cuda.synchronize()
    return clock() - start


def cached_tokens_per_second(model: AutoregressiveModel, batch: int, args: argparse.Namespace,
                             warm_up: Optional[List[float]] = None) -> float:
    """Median tokens/s of `generate()` over the repeats (after a warm-up run, whose seconds go to `warm_up`)."""
    prompt = torch.randint(args.vocab, (args.prompt_len, batch), device=args.device)
    times = [seconds(model.generate, prompt, args.tokens, temperature=1.0,
                     rng=torch.Generator(device=args.device).manual_seed(r))
             for r in range(args.repeats + 1)]
    if warm_up is not None:
        warm_up.append(times[0])
    return batch * args.tokens / statistics.median(times[1:])


def paired_tokens_per_second(model: AutoregressiveModel, eager: AutoregressiveModel, batch: int,
                             args: argparse.Namespace, warm_up: List[float]) -> Tuple[float, float]:
    """
    Median tokens/s of `generate()` for the compiled `model` and its `eager` twin, their repeats taking turns (so
    that both see the machine's load alike), after a warm-up run of each (the compiled one's seconds go to
    `warm_up`).
    """
    prompt = torch.randint(args.vocab, (args.prompt_len, batch), device=args.device)
    times: Dict[str, List[float]] = {'compiled': [], 'eager': []}
    for r in range(args.repeats + 1):
        for name, m in (('compiled', model), ('eager', eager)):
            times[name].append(seconds(m.generate, prompt, args.tokens, temperature=1.0,
                                       rng=torch.Generator(device=args.device).manual_seed(r)))
    warm_up.append(times['compiled'][0])
    return tuple(batch * args.tokens / statistics.median(times[name][1:]) for name in ('compiled', 'eager'))


def full_tokens_per_second(model: AutoregressiveModel, batch: int, args: argparse.Namespace) -> float:
    """Median tokens/s of full re-computation."""
    prompt = torch.randint(args.vocab, (args.prompt_len, batch), device=args.device)
    # A short warm-up
    full_recomputation(model, prompt, 2, torch.Generator(device=args.device).manual_seed(0))
    times = [seconds(full_recomputation, model, prompt, args.full_tokens,
                     torch.Generator(device=args.device).manual_seed(r))
             for r in range(args.full_repeats)]
    return batch * args.full_tokens / statistics.median(times)


def growth(model: AutoregressiveModel, args: argparse.Namespace) -> Dict[str, float]:
    """tokens/s (batch 1) over the first and the last `growth_window` tokens of a long generation."""
    stamps: List[float] = []
    # Called after each forward call: the prompt, then one call per generated token but the last
    handle = model.register_forward_hook(lambda *_: stamps.append(clock()))
    try:
        model.generate(torch.randint(args.vocab, (args.prompt_len, 1), device=args.device), args.growth_tokens,
                       rng=torch.Generator(device=args.device).manual_seed(0))
    finally:
        handle.remove()
    # `steps[i]`: the time from the end of call i to the end of call i + 1 (sample a token, one model step)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    w = args.growth_window
    first, last = w / sum(steps[:w]), w / sum(steps[-w:])
    return {"first": first, "last": last, "last_over_first": last / first}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("---")[-1].strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--tokens", type=int, default=256, help="new tokens per generation")
    p.add_argument("--prompt-len", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock time, or the CPU time of the main thread (use with --threads 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--full-tokens", type=int, default=256, help="new tokens for full re-computation (0: skip)")
    p.add_argument("--full-repeats", type=int, default=1)
    p.add_argument("--growth-tokens", type=int, default=1024, help="length of the growth run (0: skip)")
    p.add_argument("--growth-window", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=["default", "reduce-overhead"],
                   help="feedback models with their inference step compiled (compile=True; a torch.compile mode)")
    p.add_argument("--compare-eager", action="store_true",
                   help="with --compile: also the same models eagerly, and the speed-up of compiling")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) instead of compiling from scratch")
    args = p.parse_args(argv)
    for name in ("d_model", "heads", "d_ff", "n_layers", "vocab", "tokens", "prompt_len", "threads", "repeats",
                 "full_repeats", "growth_window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch) < 1 or args.full_tokens < 0 or args.growth_tokens < 0:
        p.error("--batch must be >= 1, --full-tokens and --growth-tokens >= 0")
    if args.compare_eager and not args.compile:
        p.error("--compare-eager compares with --compile: give both")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu counts the main thread only: use it with --threads 1")
    if 0 < args.growth_tokens < 2 * args.growth_window + 1:
        p.error("--growth-tokens must be 0 or more than twice --growth-window")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # Compiling from scratch, so that `compile_s` is a compile's time and not a warm cache's
    with compile_cache(args.warm_cache):
        run(args)


def run(args: argparse.Namespace) -> None:
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"config": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
              "load_average_before": os.getloadavg()[0], "results": {}}
    print(f"Generation, d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} n_layers={args.n_layers} "
          f"vocab={args.vocab}, {args.tokens} new tokens (full re-computation: {args.full_tokens}), "
          f"{args.threads} threads, median of {args.repeats}, {args.clock} clock; tokens/s = batch x new tokens / s")
    header = "| model | batch | cached tokens/s | full re-computation tokens/s | speed-up |"
    rows = [header, "|---|---:|---:|---:|---:|"]
    compiled_rows = ["| model | batch | eager tokens/s | compiled tokens/s | speed-up | compile s |",
                     "|---|---:|---:|---:|---:|---:|"]
    for variant in args.variants:
        model = build_variant(variant, args, args.compile)
        compiling = args.compile is not None and variant != "baseline"
        eager = build_variant(variant, args) if compiling and args.compare_eager else None
        if eager is not None:
            # The same weights
            eager.load_state_dict(model.state_dict())
        res = result["results"][variant] = {}
        for batch in args.batch:
            warm_up: List[float] = []
            if eager is not None:
                cached, eager_cached = paired_tokens_per_second(model, eager, batch, args, warm_up)
            else:
                cached = cached_tokens_per_second(model, batch, args, warm_up)
            full = full_tokens_per_second(model, batch, args) if args.full_tokens else None
            res[f"batch_{batch}"] = {"cached": cached, "full": full}
            if compiling:
                res[f"batch_{batch}"].update(compile=args.compile, compile_s=warm_up[0])
            if eager is not None:
                res[f"batch_{batch}"].update(eager_cached=eager_cached, compiled_over_eager=cached / eager_cached)
                compiled_rows.append(f"| {VARIANTS[variant]} | {batch} | {eager_cached:,.0f} | {cached:,.0f} | "
                                     f"{cached / eager_cached:.2f}x | {warm_up[0]:.0f} |")
                print(compiled_rows[-1], flush=True)
            rows.append(f"| {VARIANTS[variant]} | {batch} | {cached:,.0f} | "
                        + (f"{full:,.1f} | {cached / full:,.0f}x |" if full else "- | - |"))
            print(rows[-1], flush=True)
        if args.growth_tokens:
            res["growth"] = growth(model, args)
    print("\n" + "\n".join(rows))
    if len(compiled_rows) > 2:
        print(f"\nCompiled ({args.compile}) against eager cached generation; compile s: the first (warm-up) "
              f"generation, compiling included")
        print("\n".join(compiled_rows))
    if args.growth_tokens:
        print(f"\nPer-token cost along one generation of {args.growth_tokens} tokens (batch 1): tokens/s of the "
              f"first and last {args.growth_window} generated tokens")
        print("| model | first | last | last / first |\n|---|---:|---:|---:|")
        for variant in args.variants:
            g = result["results"][variant]["growth"]
            print(f"| {VARIANTS[variant]} | {g['first']:,.0f} | {g['last']:,.0f} | {g['last_over_first']:.2f} |")
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
