"""
---
title: Training speed and memory benchmark
summary: Tokens per second of a full training step and peak memory, for both Feedback Transformers and a
  same-size parallel transformer, measured in one run.
---

# Training benchmark

For each model: random tokens, then forward, cross-entropy loss, backward, gradient-norm clipping and an Adam
step. We time `--steps` steps after `--warmup` steps and report the median tokens per second (the models take
turns step by step, so they share the machine's load alike), the slowdown versus the parallel transformer
measured in the same run, and the peak memory of one training step (GPU: the allocator's peak; CPU: the growth
of the process's peak resident memory, measured in a fresh subprocess per model so models don't see each
other's peaks).

The models: `parallel` is PyTorch's own causal `nn.TransformerEncoder` (pre-norm, learned positions), the
fastest same-size parallel transformer at hand and the reference the slowdowns are measured against;
`transformer` is this library's causal baseline (`labml_nn/transformers/causal.py`: relative positions, a window
and a key/value cache), the model the experiments train against the feedback models.

```bash
python experiments/benchmark.py                       # the CPU configuration of the speed issue
python experiments/benchmark.py --d-model 512 --heads 8 --d-ff 2048 --n-layers 6 --seq-len 128 --batch 64 \
    --memory-only                                     # peak memory at labml_nn's experiment size
python experiments/benchmark.py --floor               # and each model's speed as a fraction of its arithmetic
```

`--floor` adds each model's [arithmetic floor](floor.py): the matrix products of one of its training steps,
replayed back to back with nothing else; the JSON line then holds `floor_tokens_per_s` and `fraction_of_floor`
(and the products' count, GFLOP and GFLOP/s) for every model, and `floor_vs_parallel`: the model's floor over the
parallel model's whole step, the smallest slowdown any implementation that runs these products could reach on this
machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.floor import floor_fields, record_products  # noqa: E402
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel  # noqa: E402
from labml_nn.transformers.feedback.build import ModelConfig, build_model  # noqa: E402

MODELS = ('parallel', 'transformer', 'feedback_transformer', 'feedback_transformer_kv')


class ParallelTransformer(nn.Module):
    """A causal pre-norm `nn.TransformerEncoder` with learned positions: the speed baseline."""

    def __init__(self, d_model: int, heads: int, d_ff: int, n_layers: int, max_len: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, activation='relu', norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.positions = nn.Parameter(torch.zeros(max_len, 1, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, state=None, return_state: bool = False) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0], device=x.device)
        return self.norm(self.encoder(x + self.positions[:x.shape[0]], mask=mask, is_causal=True))


def build(name: str, args) -> nn.Module:
    if name == 'parallel':
        transformer = ParallelTransformer(args.d_model, args.heads, args.d_ff, args.n_layers, args.seq_len)
        return AutoregressiveModel(args.vocab, args.d_model, transformer).to(args.device)
    config = ModelConfig(name, n_vocab=args.vocab, d_model=args.d_model, heads=args.heads, d_ff=args.d_ff,
                         n_layers=args.n_layers, dropout=args.dropout, memory_norm=not args.no_memory_norm)
    return build_model(config, torch.device(args.device))


# `--precision`: the dtype of autocast's matrix products (`None`: float32, no autocast)
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def train_step(model, optimizer, data, target, vocab, precision: str = 'fp32'):
    """Forward (under autocast unless fp32), loss, backward, clipping and Adam: what the experiment's step does."""
    dtype = PRECISIONS[precision]
    with torch.autocast(data.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(data)
        loss = F.cross_entropy(logits.view(-1, vocab).float(), target.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def sync(device: str):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def measure_speed(names, args) -> list:
    """
    Median tokens/s of each model. The models take turns, one step each per round, so that all of them see the
    same machine load (a shared machine's speed drifts over seconds).
    """
    runs = []
    for name in names:
        torch.manual_seed(0)
        model = build(name, args)
        runs.append((name, model, torch.optim.Adam(model.parameters(), lr=1e-4), []))
    tokens = torch.randint(0, args.vocab, (args.seq_len + 1, args.batch), device=args.device)
    data, target = tokens[:-1], tokens[1:]
    for i in range(args.warmup + args.steps):
        for _, model, optimizer, times in runs:
            sync(args.device)
            start = time.perf_counter()
            train_step(model, optimizer, data, target, args.vocab, args.precision)
            sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    results = []
    for name, model, optimizer, times in runs:
        median = statistics.median(times)
        results.append({'model': name, 'tokens_per_s': args.seq_len * args.batch / median, 'step_s': median,
                        'params': sum(p.numel() for p in model.parameters())})
        if args.floor:
            # The products of one more step of this model, replayed alone
            products = record_products(lambda m=model, o=optimizer: train_step(m, o, data, target, args.vocab,
                                                                               args.precision))
            results[-1].update(floor_fields(products, args.seq_len * args.batch, median, args.device))
    return results


def measure_memory(name: str, args) -> float:
    """Peak memory of one training step in MB."""
    torch.manual_seed(0)
    model = build(name, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab, (args.seq_len + 1, args.batch), device=args.device)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, optimizer, tokens[:-1], tokens[1:], args.vocab, args.precision)
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # CPU (Linux): reset the peak resident size, then compare it with the resident size before the step.
    # A first tiny step creates the optimizer state beforehand.
    train_step(model, optimizer, tokens[:2], tokens[1:3], args.vocab, args.precision)
    Path('/proc/self/clear_refs').write_text('5')
    base = _proc_status_kb('VmRSS')
    train_step(model, optimizer, tokens[:-1], tokens[1:], args.vocab, args.precision)
    return (_proc_status_kb('VmHWM') - base) / 1024


def _proc_status_kb(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory on CPU needs Linux)")


def memory_in_subprocess(name: str, argv) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, '--only', name, '--memory-child'],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


@contextmanager
def compile_cache(warm: bool) -> Iterator[None]:
    """
    Inductor's on-disk caches in a new temporary folder while inside, so that compiling starts from scratch and
    its seconds mean what they say; unchanged when `warm`.
    """
    if warm:
        yield
        return
    before = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    with tempfile.TemporaryDirectory() as folder:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = folder
        try:
            yield
        finally:
            if before is None:
                del os.environ['TORCHINDUCTOR_CACHE_DIR']
            else:
                os.environ['TORCHINDUCTOR_CACHE_DIR'] = before


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    """The model and batch sizes (the README's by default), threads and device: the training benchmarks' own."""
    p.add_argument('--d-model', type=int, default=128)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--d-ff', type=int, default=256)
    p.add_argument('--n-layers', type=int, default=4)
    p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu')


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('---')[-1].strip().splitlines()[0])
    add_size_arguments(p)
    p.add_argument('--vocab', type=int, default=65)
    p.add_argument('--dropout', type=float, default=0.0)
    p.add_argument('--no-memory-norm', action='store_true',
                   help="labml_nn's feedback models: no memory normalization (the build's default has it)")
    p.add_argument('--precision', choices=sorted(PRECISIONS), default='fp32',
                   help='matrix products under torch.autocast in bf16 or fp16 (fp32: no autocast)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--only', choices=MODELS, action='append', help='measure only these models')
    p.add_argument('--memory-only', action='store_true', help='skip the speed measurement')
    p.add_argument('--no-memory', action='store_true', help='skip the memory measurement')
    p.add_argument('--floor', action='store_true',
                   help="also each model's arithmetic floor: its step's matrix products alone (floor.py)")
    p.add_argument('--memory-child', action='store_true', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    models = args.only or list(MODELS)
    if args.memory_child:
        print(measure_memory(models[0], args))
        return
    child_argv = [a for a in argv if a not in ('--memory-only', '--no-memory')]
    child_argv = [a for i, a in enumerate(child_argv) if a != '--only' and (i == 0 or child_argv[i - 1] != '--only')]
    results = [{'model': name} for name in models] if args.memory_only else measure_speed(models, args)
    if not args.no_memory:
        for r in results:
            r['peak_mb'] = memory_in_subprocess(r['model'], child_argv)
    base = next((r for r in results if r['model'] == 'parallel' and 'tokens_per_s' in r), None)
    print(f"d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} n_layers={args.n_layers} "
          f"seq_len={args.seq_len} batch={args.batch} threads={args.threads} device={args.device} "
          f"precision={args.precision} torch={torch.__version__}")
    print(f"{'model':<26}{'tokens/s':>12}{'step ms':>10}{'slowdown':>10}{'peak MB':>10}")
    for r in results:
        if base is not None and 'tokens_per_s' in r:
            r['slowdown_vs_parallel'] = base['tokens_per_s'] / r['tokens_per_s']
        tps = f"{r['tokens_per_s']:,.0f}" if 'tokens_per_s' in r else '-'
        ms = f"{r['step_s'] * 1e3:.1f}" if 'step_s' in r else '-'
        if base is not None and 'floor_s' in r:
            # The best slowdown any implementation of this model's products could reach: its floor over the
            # parallel model's whole step
            r['floor_vs_parallel'] = r['floor_s'] / base['step_s']
        slow = f"{r['slowdown_vs_parallel']:.2f}x" if 'slowdown_vs_parallel' in r else '-'
        mb = f"{r['peak_mb']:,.0f}" if 'peak_mb' in r else '-'
        print(f"{r['model']:<26}{tps:>12}{ms:>10}{slow:>10}{mb:>10}")
    if any('floor_s' in r for r in results):
        print(f"{'model':<26}{'products':>10}{'GFLOP':>8}{'floor ms':>10}{'floor tok/s':>13}{'of floor':>10}"
              f"{'floor/parallel':>16}")
        for r in (r for r in results if 'floor_s' in r):
            vs = f"{r['floor_vs_parallel']:.2f}x" if 'floor_vs_parallel' in r else '-'
            print(f"{r['model']:<26}{r['floor_products']:>10}{r['floor_gflop']:>8.2f}{r['floor_s'] * 1e3:>10.1f}"
                  f"{r['floor_tokens_per_s']:>13,.0f}{r['fraction_of_floor']:>10.1%}{vs:>16}")
    print(json.dumps({'config': {k: v for k, v in vars(args).items() if k not in ('only', 'memory_child')},
                      'results': results}))


if __name__ == '__main__':
    main()
