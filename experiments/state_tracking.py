"""
The paper's algorithmic state-tracking task: Feedback Transformers against a parallel transformer with the same
attention span, test accuracy on the printed values of held-out programs.

    python experiments/state_tracking.py --preset cpu       # the README's CPU run (2 processes side by side)
    python experiments/state_tracking.py --preset paper     # the authors' sizes, for a GPU
    python experiments/state_tracking.py --preset cpu --models transformer epochs=2   # key=value go to every run

Every model trains in its own `python -m labml_nn.transformers.feedback.state_tracking` process (`--jobs` of them
at a time, one thread each on CPU). The script reads every run's checkpoint and writes into `--out` (default
`results/`) `state_tracking_<preset>.md` (the table), `.json` and `.png` (validation accuracy on print positions
against training steps), and prints one JSON line last: test accuracy per model, the settings and wall times.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

from figure import NO_MATPLOTLIB, can_plot, new_figure, save_figure
from runs import commit, run_and_load

MODELS = ['feedback_transformer_kv', 'transformer', 'feedback_transformer']
# The authors' test accuracy (Fan et al. 2020, table 3 of v3): variables -> (Transformer, Feedback Transformer)
PAPER = {3: (0.337, 0.991), 5: (0.375, 0.926)}

PRESETS: Dict[str, Dict[str, List[str]]] = {
    # One variable, trained on programs of 20 statements (77 words) and tested on programs of 100 (380 words), the
    # paper's length; span 8, so the 4-layer parallel transformer sees 32 words back (experiments/state_tracking_log.md
    # says how this was chosen)
    'cpu': {
        'all': ['variables=1', 'statements=100', 'train_statements=20', 'memory_span=8', 'd_model=64', 'heads=4',
                'd_ff=256', 'seq_len=64', 'batch_size=32', 'epochs=16', 'epoch_segments=200', 'valid_programs=96',
                'test_programs=500', 'optimizer.optimizer=AdamCosine', 'optimizer.warmup=100',
                'optimizer.learning_rate=3e-3', 'num_threads=1'],
        'feedback': ['n_layers=2', 'memory_norm=true'],
        'transformer': ['n_layers=4'],
    },
    # The authors' scripts (experiments/feedback/algorithmic_3var.sh): d=256, 4 heads, FFN 1024, feedback 4 layers
    # and transformer 8, segments of 64 tokens with carried memory, span 100, dropout 0.2, Adam 1e-4 with 1,000
    # warm-up steps, gradient clipping 0.1, 50 epochs of 1,000 batches of 512 streams. (They reuse 10,000 training
    # programs; here every epoch draws fresh ones.)
    'paper': {
        'all': ['variables=3', 'statements=100', 'train_statements=100', 'memory_span=100', 'd_model=256',
                'heads=4', 'd_ff=1024', 'dropout=0.2', 'seq_len=64', 'batch_size=512', 'epochs=50',
                'epoch_segments=1000', 'valid_programs=1000', 'test_programs=1000', 'optimizer.optimizer=AdamWarmup',
                'optimizer.learning_rate=1e-4', 'optimizer.warmup=1000', 'grad_norm_clip=0.1'],
        'feedback': ['n_layers=4', 'memory_norm=true'],
        'transformer': ['n_layers=8'],
    },
}


def model_args(preset: str, model: str, overrides: List[str]) -> List[str]:
    """The `key=value` arguments of one model's run."""
    p = PRESETS[preset]
    return [f'model={model}', *p['all'], *p['transformer' if model == 'transformer' else 'feedback'], *overrides]


def run_one(model: str, args: List[str], tag: str, out: Path) -> Dict[str, Any]:
    """Train `model` in a subprocess; return its test and validation results, timings and curve."""
    uuid = f'{tag}_{model}_{int(time.time())}'
    payload, wall = run_and_load('labml_nn.transformers.feedback.state_tracking', args, f'state_tracking_{model}',
                                 uuid, log=out / f'{uuid}.log', env={'OMP_NUM_THREADS': '1'})
    history, progress = payload['history'], payload['progress']
    curve = [{'step': h['step'], 'valid_accuracy': h['valid_accuracy'], 'train_seconds': h['train_seconds']}
             for h in history['evaluations']]
    return {'model': model, 'run': uuid, 'steps': progress['step'], 'test_accuracy': history['test']['accuracy'],
            'test_loss': history['test']['loss'], 'valid_accuracy': curve[-1]['valid_accuracy'],
            'wall_seconds': wall, 'train_seconds': progress['train_seconds'], 'args': args, 'curve': curve}


def table(results: List[Dict[str, Any]], variables: int) -> str:
    paper = PAPER.get(variables)
    lines = ['| model | steps | test accuracy | valid accuracy | paper (test) | wall time |',
             '|---|---:|---:|---:|---:|---:|']
    for r in results:
        ref = '' if paper is None else f"{paper[0 if r['model'] == 'transformer' else 1]:.3f}"
        lines.append(f"| `{r['model']}` | {r['steps']:,} | **{r['test_accuracy']:.3f}** | {r['valid_accuracy']:.3f} "
                     f"| {ref} | {r['wall_seconds'] / 60:.1f} min |")
    return '\n'.join(lines)


def plot(results: List[Dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = new_figure()
    for r in results:
        steps = [0] + [h['step'] for h in r['curve']]
        line, = ax.plot(steps, [float('nan')] + [h['valid_accuracy'] for h in r['curve']], 'o-',
                        label=f"{r['model']} (validation)")
        ax.plot([r['steps']], [r['test_accuracy']], '*', markersize=14, color=line.get_color(),
                label=f"{r['model']} (test: {r['test_accuracy']:.3f})")
    ax.axhline(0.1, color='gray', linestyle=':', label='chance (0.10)')
    ax.set_xlabel('training step')
    ax.set_ylabel('accuracy on print positions')
    ax.set_ylim(0, 1)
    save_figure(fig, ax, path, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--models', nargs='+', choices=MODELS, default=MODELS)
    parser.add_argument('--jobs', type=int, default=2, help='runs at the same time')
    parser.add_argument('--out', type=Path, default=Path('results'))
    parser.add_argument('--tag', default='', help='names the output files (default: the preset)')
    parser.add_argument('overrides', nargs='*', help='key=value configs for every run')
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not can_plot():
        print(NO_MATPLOTLIB, flush=True)
    tag = args.tag or f'state_tracking_{args.preset}'
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, m, model_args(args.preset, m, args.overrides), tag, args.out)
                   for m in args.models]
        results = [f.result() for f in futures]
    total = time.perf_counter() - start
    settings = dict(a.split('=', 1) for a in PRESETS[args.preset]['all'] + args.overrides)
    variables = int(settings.get('variables', 3))
    header = (f"Preset `{args.preset}`: {' '.join(PRESETS[args.preset]['all'] + args.overrides)}; feedback models "
              f"{' '.join(PRESETS[args.preset]['feedback'])}, transformer "
              f"{' '.join(PRESETS[args.preset]['transformer'])}; commit {commit()}; "
              f"{total / 60:.1f} min in all\n\n")
    md = table(results, variables)
    (args.out / f'{tag}.md').write_text(header + md + '\n')
    (args.out / f'{tag}.json').write_text(json.dumps({'preset': args.preset, 'results': results}, indent=2))
    if can_plot():
        plot(results, args.out / f'{tag}.png', header.strip())
    print(header + md, flush=True)
    print(json.dumps({'accuracy': {r['model']: round(r['test_accuracy'], 4) for r in results},
                      'valid_accuracy': {r['model']: round(r['valid_accuracy'], 4) for r in results},
                      'settings': {'preset': args.preset, **settings,
                                   **{r['model']: ' '.join(r['args']) for r in results}},
                      'wall_seconds': {**{r['model']: round(r['wall_seconds'], 1) for r in results},
                                       'total': round(total, 1)}}))


if __name__ == '__main__':
    main()
