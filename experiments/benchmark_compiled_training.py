r"""
---
title: Does a compiled training step pay on this machine?
summary: The fused training loop (hand-written backward) against the fixed-shape step compiled by torch.compile
  with its backward derived by AOTAutograd, forward and backward timed apart, the same gradients checked.
---

# A compiled training step, measured

The speed issue asked for the training loop's step compiled over fixed shapes. Before building a compiled
*hand-written* backward, this script measures the cheapest way to get one: [the fixed-shape step](
../labml_nn/transformers/feedback/static_step.html) (attention over the whole buffer, invisible slots masked) compiled
by `torch.compile`, whose backward AOTAutograd derives and compiles too. The buffer of keys and values is updated
functionally (`index_copy`, a new buffer per step), because a compiled step saves its input buffer for its backward
pass and an in-place write would invalidate it.

It runs the loop alone (embedded inputs to the last layer's outputs, then the backward pass from a fixed output
gradient), at the README's size by default, and reports per variant the median forward and backward times, the
one-time compile time (from scratch: inductor's on-disk cache goes to a new folder unless `--warm-cache`) and the
largest gradient difference from the fused loop (relative to each gradient's largest entry):

* `fused`: the library's training path ([fused.py](../labml_nn/transformers/feedback/fused.html));
* `compiled`: the fixed-shape step compiled with inductor's default (Python) wrapper;
* `compiled-cpp`: the same with inductor's C++ wrapper (`cpp_wrapper`), which calls the kernels without Python;
* `compiled-steps`: the fused loop with its own step functions compiled, forward and the hand-written backward
  ([one step, one function](../labml_nn/transformers/feedback/fused.html#steps)), with symbolic sizes: no padding,
  no functional copies, the same records as the eager loop;
* `cuda-graphs` (on a GPU, `--device cuda`): the step compiled with `mode="reduce-overhead"`, each compiled call
  replayed as a CUDA graph.

The variants take turns repeat by repeat (the machine's speed drifts). This is a measuring tool, not a training
path: the functional buffer keeps one copy of the buffer per step for the backward pass, memory that grows as
$T^2$, which the fused loop avoids.

```bash
python experiments/benchmark_compiled_training.py                       # both variants, README size
python experiments/benchmark_compiled_training.py --variants kv --repeats 5
python experiments/benchmark_compiled_training.py --device cuda                  # on a GPU: with CUDA graphs
```
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.benchmark import add_size_arguments, compile_cache, sync  # noqa: E402
from labml_nn.transformers.feedback.build import ModelConfig, build_model  # noqa: E402
from labml_nn.transformers.feedback.compiled import check_compile  # noqa: E402
from labml_nn.transformers.feedback.fused import compiled_steps, fused_forward  # noqa: E402
from labml_nn.transformers.feedback.fused_steps import loop_config, loop_weights  # noqa: E402
from labml_nn.transformers.feedback.static_step import slot_bounds, static_step  # noqa: E402

VARIANTS = {'weighted': 'feedback_transformer', 'kv': 'feedback_transformer_kv'}
# The compiled variants and `torch.compile`'s keyword arguments for each
COMPILED = {'compiled': {'options': {'size_asserts': False}},
            'compiled-cpp': {'options': {'size_asserts': False, 'cpp_wrapper': True}},
            'cuda-graphs': {'mode': 'reduce-overhead'},
            # The fused loop's step functions: `fused.compiled_steps` holds their options
            'compiled-steps': None}


def compiled_loop(transformer, how: dict, T: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loop as `T` calls of the fixed-shape step compiled with `how`, in autograd: `x_seq -> outputs`."""
    cfg = loop_config(transformer, 0, True, dropout=False, dtype=None)

    def step(x, work, bounds, layers, mem_w, kv_w, kv_b, slot):
        x, kv = static_step(cfg, x, work, bounds, layers, mem_w, kv_w, kv_b)
        # The entry into its slot, functionally (a new buffer: the old one is saved for the backward pass)
        return x, work.index_copy(4, slot, kv.unsqueeze(4))

    compiled = torch.compile(step, **how)
    bounds = [slot_bounds(t, cfg.memory_span, 0, device) for t in range(T)]
    slots = [torch.tensor([t], device=device) for t in range(T)]

    def run(x_seq: torch.Tensor) -> torch.Tensor:
        B = x_seq.shape[1]
        # The weights with position terms for all `T` slots, made in autograd as the fused loop's are
        layers = loop_weights(transformer, T)
        kv_w, kv_b = transformer.kv_projection()
        mem_w = transformer.memory_weights()
        work = x_seq.new_zeros((cfg.groups, 2, B, cfg.heads, T, cfg.d_k))
        outputs = []
        for i in range(T):
            x, work = compiled(x_seq[i], work, bounds[i], layers, mem_w, kv_w, kv_b, slots[i])
            outputs.append(x)
        return transformer.norm(torch.stack(outputs))

    return run


def timed(run: Callable[[torch.Tensor], torch.Tensor], x_seq: torch.Tensor, d_out: torch.Tensor):
    """Forward and backward seconds of one call (the gradients land in `x_seq.grad` and the parameters')."""
    x_seq.grad = None
    sync(x_seq.device.type)
    start = time.perf_counter()
    out = run(x_seq)
    sync(x_seq.device.type)
    middle = time.perf_counter()
    out.backward(d_out)
    sync(x_seq.device.type)
    end = time.perf_counter()
    return middle - start, end - middle


def measure(variant: str, args) -> List[dict]:
    torch.manual_seed(0)
    config = ModelConfig(VARIANTS[variant], n_vocab=65, d_model=args.d_model, heads=args.heads, d_ff=args.d_ff,
                         n_layers=args.n_layers, dropout=0.0)
    device = torch.device(args.device)
    transformer = build_model(config, device).transformer
    T, B = args.seq_len, args.batch
    x_seq = torch.randn(T, B, args.d_model, device=device, requires_grad=True)
    d_out = torch.randn(T, B, args.d_model, device=device)
    runs: Dict[str, Callable] = {'fused': lambda x: fused_forward(transformer, x, None, False)}
    # Compiled code of the step functions is kept per function: compile afresh for each model
    torch._dynamo.reset()
    for name in args.compiled:
        if name == 'compiled-steps':
            runs[name] = partial(fused_forward, transformer, state=None, return_state=False, steps=compiled_steps())
        else:
            runs[name] = compiled_loop(transformer, COMPILED[name], T, device)
    # The reference gradients (fused loop), and each compiled variant's first call (its compile) checked against them
    params = list(transformer.parameters())

    def gradients(run):
        transformer.zero_grad(set_to_none=True)
        seconds = timed(run, x_seq, d_out)
        return seconds, [x_seq.grad.clone()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                for p in params]

    _, reference = gradients(runs['fused'])
    results = {name: {'model': VARIANTS[variant], 'variant': name, 'forward': [], 'backward': []} for name in runs}
    for name in args.compiled:
        (fwd, bwd), grads = gradients(runs[name])
        results[name]['compile_s'] = fwd + bwd
        # The largest difference of a gradient, relative to that gradient's largest entry
        results[name]['max_grad_diff'] = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                             for g, r in zip(grads, reference))
    for _ in range(args.repeats):
        for name, run in runs.items():
            fwd, bwd = timed(run, x_seq, d_out)
            results[name]['forward'].append(fwd)
            results[name]['backward'].append(bwd)
    out = []
    for r in results.values():
        fwd, bwd = statistics.median(r.pop('forward')), statistics.median(r.pop('backward'))
        r.update(forward_ms=fwd * 1e3, backward_ms=bwd * 1e3, tokens_per_s=T * B / (fwd + bwd))
        out.append(r)
    fused = out[0]['forward_ms'] + out[0]['backward_ms']
    for r in out:
        r['speedup_vs_fused'] = fused / (r['forward_ms'] + r['backward_ms'])
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('---')[2].strip().split('\n')[0])
    p.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument('--compiled', nargs='+', choices=list(COMPILED),
                   help='the compiled variants (default: compiled, compiled-cpp, compiled-steps on the CPU; compiled, '
                        'cuda-graphs, compiled-steps on a GPU)')
    add_size_arguments(p)
    p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--warm-cache', action='store_true',
                   help="keep inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) instead of compiling from scratch")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.compiled is None:
        args.compiled = ['compiled', 'cuda-graphs' if args.device.startswith('cuda') else 'compiled-cpp',
                         'compiled-steps']
    if 'cuda-graphs' in args.compiled and not args.device.startswith('cuda'):
        print("error: --compiled cuda-graphs needs --device cuda", file=sys.stderr)
        sys.exit(2)
    try:
        check_compile(True, torch.device(args.device).type)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    # A cold compile (else `compile_s` is a warm cache's load time)
    with compile_cache(args.warm_cache):
        results = [r for v in args.variants for r in measure(v, args)]
    print(f"d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} n_layers={args.n_layers} "
          f"seq_len={args.seq_len} batch={args.batch} threads={args.threads} device={args.device} "
          f"torch={torch.__version__}")
    print(f"{'model':<26}{'variant':<14}{'fwd ms':>8}{'bwd ms':>8}{'tokens/s':>10}{'vs fused':>10}"
          f"{'compile s':>11}{'grad diff':>11}")
    for r in results:
        compile_s = f"{r['compile_s']:.0f}" if 'compile_s' in r else '-'
        diff = f"{r['max_grad_diff']:.1e}" if 'max_grad_diff' in r else '-'
        print(f"{r['model']:<26}{r['variant']:<14}{r['forward_ms']:>8.1f}{r['backward_ms']:>8.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['speedup_vs_fused']:>9.2f}x{compile_s:>11}{diff:>11}")
    print(json.dumps({'config': vars(args), 'results': results}))


if __name__ == '__main__':
    main()
