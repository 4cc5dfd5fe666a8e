"""
Train the three models of the experiment on an equal budget and compare them.

    python experiments/compare_models.py --preset quality        # the README's quality table (1 epoch each)
    python experiments/compare_models.py --preset cpu            # the README's CPU recipe
    python experiments/compare_models.py --preset cpu train_steps=50   # extra key=value go to every run

Each model runs as its own `python -m labml_nn.transformers.feedback.experiment` process with the same configs
(same data order, same number of steps and tokens). The script reads every run's checkpoint and writes, into
`--out` (default `results/`), a markdown table `<preset>.md`, the numbers as `<preset>.json`, and the loss
curves `<preset>.png`, and prints one JSON line last (per model: the final validation loss and accuracy, training
tokens/s, wall time and steps).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from figure import NO_MATPLOTLIB, can_plot, new_figure, save_figure
from runs import commit, run_and_load
from train_cpu import CPU_RECIPE

from labml_nn.transformers.feedback.build import MODELS

# labml_nn's KV quality setting: 1 epoch of Tiny Shakespeare, about 490 steps
PRESETS = {
    'quality': ['d_model=128', 'heads=4', 'd_ff=256', 'n_layers=4', 'seq_len=64', 'batch_size=32', 'epochs=1',
                'inner_iterations=5', 'num_threads=1'],
    # The README's CPU recipe (`train_cpu.py`)
    'cpu': [a for a in CPU_RECIPE if not a.startswith('model=')],
}


def run_one(model: str, args: List[str], tag: str) -> Dict[str, Any]:
    """Train `model` in a subprocess; return its final validation result, timings and loss history."""
    uuid = f'{tag}_{model}_{int(time.time())}'
    payload, wall = run_and_load('labml_nn.transformers.feedback.experiment', [f'model={model}', *args], model, uuid)
    history, progress = payload['history'], payload['progress']
    # The validation on the whole validation set at the end of the run
    final = history['evaluations'][-1]
    return {'model': model, 'run': uuid, 'steps': progress['step'], 'tokens': progress['tokens'],
            'valid_loss': final['valid_loss'], 'valid_accuracy': final['valid_accuracy'],
            'wall_seconds': wall, 'train_seconds': progress['train_seconds'],
            'tokens_per_second': progress['tokens'] / progress['train_seconds'],
            'history': history}


def table(results: List[Dict[str, Any]]) -> str:
    lines = ['| model | steps | valid loss | valid accuracy | wall time | training tokens/s |',
             '|---|---:|---:|---:|---:|---:|']
    for r in results:
        lines.append(f"| `{r['model']}` | {r['steps']} | {r['valid_loss']:.3f} | {r['valid_accuracy']:.3f} | "
                     f"{r['wall_seconds'] / 60:.1f} min | {r['tokens_per_second']:,.0f} |")
    return '\n'.join(lines)


def plot(results: List[Dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = new_figure()
    for r in results:
        steps = torch.tensor([h['step'] for h in r['history']['train']], dtype=torch.float)
        loss = torch.tensor([h['loss'] for h in r['history']['train']])
        # A moving average over 20 steps
        width = min(20, len(loss))
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], width, stride=1)[0, 0]
        line, = ax.plot(steps[width - 1:], smooth, label=f"{r['model']} (train)")
        valid = r['history']['valid']
        ax.plot([h['step'] for h in valid], [h['loss'] for h in valid], 'o--', color=line.get_color(),
                label=f"{r['model']} (valid, a share)")
        full = r['history']['evaluations']
        ax.plot([h['step'] for h in full], [h['valid_loss'] for h in full], '*', markersize=12,
                color=line.get_color(), label=f"{r['model']} (whole validation set)")
    ax.set_xlabel('step')
    ax.set_ylabel('cross-entropy loss')
    save_figure(fig, ax, path, title, width=90, fontsize=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--models', nargs='+', choices=MODELS, default=MODELS)
    parser.add_argument('--out', type=Path, default=Path('results'))
    parser.add_argument('overrides', nargs='*', help='key=value configs for every run')
    args = parser.parse_args()
    if not can_plot():
        print(NO_MATPLOTLIB, flush=True)
    run_args = PRESETS[args.preset] + args.overrides
    results = [run_one(model, run_args, args.preset) for model in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(results)
    header = f"Configs: {' '.join(run_args)}; commit {commit()}\n\n"
    (args.out / f'{args.preset}.md').write_text(header + md + '\n')
    (args.out / f'{args.preset}.json').write_text(json.dumps(
        [{k: v for k, v in r.items() if k != 'history'} for r in results], indent=2))
    if can_plot():
        plot(results, args.out / f'{args.preset}.png', f"Tiny Shakespeare, {args.preset}: {' '.join(run_args)}")
    print(header + md, flush=True)
    print(json.dumps({'preset': args.preset, 'settings': ' '.join(run_args), 'commit': commit(),
                      **{key: {r['model']: round(r[key], 4) for r in results}
                         for key in ('valid_loss', 'valid_accuracy', 'tokens_per_second', 'wall_seconds')},
                      'steps': {r['model']: r['steps'] for r in results}}))


if __name__ == '__main__':
    main()
