"""
The paper's algorithmic state-tracking task: Feedback Transformers against parallel transformers, one that sees only
a local window and one that sees every test program whole, on held-out programs; test accuracy on the printed
values, by seed and broken down by how far back the assignment is and what last changed the variable.

    python experiments/state_tracking.py --preset cpu                 # the README's CPU run: one seed, every row
    python experiments/state_tracking.py --preset cpu --seeds 3       # three seeds a row: mean, min, max
    python experiments/state_tracking.py --preset cpu --search        # the settings search, on validation only
    python experiments/state_tracking.py --preset paper               # the authors' setup, for a GPU
    python experiments/state_tracking.py --preset cpu --rows transformer_full epochs=2   # key=value to every run

Every run trains in its own `python -m labml_nn.transformers.feedback.state_tracking` process (`--jobs` of them at a
time, one thread each on CPU). **The protocol**: `--search` trains every row of the preset over its grid of learning
rates and warm-ups with `evaluate_test=false` (the test programs are never evaluated) and picks each row's setting by
its final validation accuracy; those settings are written into `PRESETS` by hand, and a plain run (or `--seeds N`)
evaluates the test set once per run, at its end. Seeds change the initialization and the training programs; the
validation and test programs are the same for every seed and every row (`data_seed`).

It writes into `--out` (default `results/`) `<tag>.md` (the tables), `<tag>.json` and `<tag>.png` (validation
accuracy against training steps), and prints one JSON line last: at least `accuracy` (row to mean test accuracy),
`visible_words` (row to how many words back the row's model can reach without recurrence, `null` for a feedback
model) and `program_words` (the longest test program in words).
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

from figure import NO_MATPLOTLIB, can_plot, new_figure, save_figure
from runs import commit, run_and_load

from labml_nn.tasks.programs import CHANGED_BY, DISTANCES, ProgramSpec, ProgramSplits

# The authors' test accuracy (Fan et al. 2020, table 3 of v3): variables -> (Transformer, Feedback Transformer)
PAPER = {3: (0.337, 0.991), 5: (0.375, 0.926)}

PRESETS: Dict[str, Dict[str, Any]] = {
    # One variable, trained on programs of 20 statements (77 words on average) and tested on programs of 100 (377
    # words, at most 447), the paper's length. d=64, 4 heads, carried memory over segments of 64 words, AdamCosine
    # over 3,200 steps. `settings` are each row's learning rate and warm-up, chosen on validation accuracy by
    # `--search` (experiments/state_tracking_log.md has every run).
    'cpu': {
        'all': ['variables=1', 'statements=100', 'train_statements=20', 'd_model=64', 'heads=4', 'd_ff=256',
                'seq_len=64', 'batch_size=32', 'epochs=16', 'epoch_segments=200', 'valid_programs=96',
                'test_programs=500', 'optimizer.optimizer=AdamCosine', 'num_threads=1'],
        'rows': {
            # The Feedback Transformers: 2 layers, each step attends to the last 8 memory vectors
            'feedback_transformer_kv': ['model=feedback_transformer_kv', 'n_layers=2', 'memory_norm=true',
                                        'memory_span=8'],
            'feedback_transformer': ['model=feedback_transformer', 'n_layers=2', 'memory_norm=true',
                                     'memory_span=8'],
            # A parallel transformer with twice the layers and a window of 8: it sees the last 33 words
            'transformer_window': ['model=transformer', 'n_layers=4', 'memory_span=8'],
            # The same with a window of 512 words: every layer sees the whole of every test program
            'transformer_full': ['model=transformer', 'n_layers=4', 'memory_span=512'],
            # ... and trained on programs of the test's length
            'transformer_full_train100': ['model=transformer', 'n_layers=4', 'memory_span=512',
                                          'train_statements=100'],
        },
        # The rows of a plain run (within 30 minutes on 2 cores); `--rows` picks others
        'default_rows': ['feedback_transformer_kv', 'feedback_transformer', 'transformer_window',
                         'transformer_full'],
        # `feedback_transformer_kv` and `transformer_full` by their own `--search` (the log has the grid); the rows
        # whose search did not finish borrow a sibling's: `feedback_transformer` the KV model's,
        # `transformer_full_train100` the full view's, `transformer_window` the rate of the log's earlier runs
        'settings': {
            'feedback_transformer_kv': ['optimizer.learning_rate=3e-3', 'optimizer.warmup=100'],
            'feedback_transformer': ['optimizer.learning_rate=3e-3', 'optimizer.warmup=100'],
            'transformer_window': ['optimizer.learning_rate=3e-3', 'optimizer.warmup=100'],
            'transformer_full': ['optimizer.learning_rate=3e-3', 'optimizer.warmup=800'],
            'transformer_full_train100': ['optimizer.learning_rate=3e-3', 'optimizer.warmup=800'],
        },
        # The settings search: every row over these learning rates and warm-ups, the grid the log's search ran
        # (lower rates were not tried: at 1e-3 the feedback model already learned more slowly than at 3e-3)
        'search': {'optimizer.learning_rate': ['1e-3', '3e-3'], 'optimizer.warmup': ['100', '800']},
    },
    # The authors' scripts (experiments/feedback/algorithmic_3var.sh of facebookresearch/transformer-sequential):
    # 3 variables, 10,000 training programs reused every epoch, 1,000 validation and test programs whose rows are
    # cut from their concatenation, d=256, 4 heads, FFN 1024, segments of 64 tokens with carried memory, attention
    # limit 100, dropout 0.2, Adam 1e-4 with 1,000 warm-up steps, gradient clipping 0.1, 50 epochs of 1,000 batches
    # of 512 streams; feedback 4 layers, transformer 8 (it sees 800 words back: every test program)
    'paper': {
        'all': ['variables=3', 'statements=100', 'train_statements=100', 'train_programs=10000',
                'valid_programs=1000', 'test_programs=1000', 'held_out_layout=cut', 'memory_span=100',
                'd_model=256', 'heads=4', 'd_ff=1024', 'dropout=0.2', 'seq_len=64', 'batch_size=512', 'epochs=50',
                'epoch_segments=1000', 'optimizer.optimizer=AdamWarmup', 'optimizer.learning_rate=1e-4',
                'optimizer.warmup=1000', 'grad_norm_clip=0.1'],
        'rows': {
            'feedback_transformer_kv': ['model=feedback_transformer_kv', 'n_layers=4', 'memory_norm=true'],
            'feedback_transformer': ['model=feedback_transformer', 'n_layers=4', 'memory_norm=true'],
            'transformer': ['model=transformer', 'n_layers=8'],
        },
        'default_rows': ['feedback_transformer', 'transformer'],
        'settings': {},
        'search': {},
    },
}


def row_args(preset: str, row: str, overrides: List[str], seed: Optional[int] = None) -> List[str]:
    """The `key=value` arguments of one row's run."""
    p = PRESETS[preset]
    seed_args = [] if seed is None else [f'seed={seed}']
    return [*p['all'], *p['rows'][row], *p['settings'].get(row, []), *seed_args, *overrides]


def settings_of(args: List[str]) -> Dict[str, str]:
    """`key=value` arguments as a dictionary (the last value of a key wins)."""
    return dict(a.split('=', 1) for a in args)


def visible_words(args: List[str]) -> Optional[int]:
    """
    How many words before a position can reach it without recurrence: for the parallel transformer `n_layers`
    windows of `memory_span` words (`None` for a Feedback Transformer, whose memory reaches every earlier word).
    """
    s = settings_of(args)
    if s.get('model') != 'transformer':
        return None
    return int(s['n_layers']) * int(s['memory_span'])


def program_words(args: List[str]) -> int:
    """The longest test program of a run's settings, in words (its `END` included)."""
    s = settings_of(args)
    spec = ProgramSpec(int(s['variables']), int(s['statements']))
    splits = ProgramSplits(spec, int(s.get('data_seed', 5)), int(s['valid_programs']), int(s['test_programs']))
    return max(len(p.tokens) for p in splits.test)


def run_one(row: str, args: List[str], tag: str, out: Path) -> Dict[str, Any]:
    """Train one row in a subprocess; return its results, timings and validation curve."""
    uuid = f'{tag}_{row}_{int(time.time() * 1000)}'
    name = f"state_tracking_{settings_of(args)['model']}"
    payload, wall = run_and_load('labml_nn.transformers.feedback.state_tracking', args, name, uuid,
                                 log=out / f'{uuid}.log', env={'OMP_NUM_THREADS': '1'})
    history, progress = payload['history'], payload['progress']
    curve = [{'step': h['step'], 'valid_accuracy': h['valid_accuracy'], 'train_seconds': h['train_seconds']}
             for h in history['evaluations']]
    result = {'row': row, 'run': uuid, 'args': args, 'steps': progress['step'], 'wall_seconds': wall,
              'train_seconds': progress['train_seconds'], 'valid_accuracy': curve[-1]['valid_accuracy'],
              'curve': curve, 'visible_words': visible_words(args)}
    if 'test' in history:
        test = history['test']
        result.update(test_accuracy=test['accuracy'], test_loss=test['loss'], distance=test['distance'],
                      changed_by=test['changed_by'])
    return result


def run_all(jobs: List[Dict[str, Any]], n_jobs: int, tag: str, out: Path) -> List[Dict[str, Any]]:
    """Every job (`row`, `args`), `n_jobs` at a time."""
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        futures = [pool.submit(run_one, j['row'], j['args'], tag, out) for j in jobs]
        return [f.result() for f in futures]


def spread(values: List[float]) -> Dict[str, float]:
    return {'mean': statistics.fmean(values), 'min': min(values), 'max': max(values), 'n': len(values)}


def summarize(results: List[Dict[str, Any]], rows: List[str]) -> Dict[str, Any]:
    """Per row: test accuracy over seeds (mean, min, max) and the breakdowns, each averaged over seeds."""
    summary: Dict[str, Any] = {}
    for row in rows:
        mine = [r for r in results if r['row'] == row]
        cells = {}
        for kind, names in (('distance', [n for n, _ in DISTANCES]), ('changed_by', list(CHANGED_BY))):
            cells[kind] = {n: {'accuracy': statistics.fmean(r[kind][n]['accuracy'] for r in mine),
                               'prints': mine[0][kind][n]['prints']} for n in names}
        summary[row] = {'test': spread([r['test_accuracy'] for r in mine]),
                        'valid': spread([r['valid_accuracy'] for r in mine]),
                        'wall_minutes': statistics.fmean(r['wall_seconds'] for r in mine) / 60,
                        'visible_words': mine[0]['visible_words'], **cells}
    return summary


def tables(summary: Dict[str, Any], words: int, variables: int) -> str:
    """The markdown tables: accuracy with what each model sees, then the breakdowns."""
    paper = PAPER.get(variables)
    lines = ['| row | sees without recurrence | test accuracy (mean) | min | max | seeds | valid (mean) | '
             'paper (test) | wall time |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for row, s in summary.items():
        v = s['visible_words']
        sees = 'every earlier word (recurrent memory)' if v is None else (
            f'{v} words: every test program' if v >= words else f'the last {v} words')
        ref = '' if paper is None else f"{paper[1 if row.startswith('feedback') else 0]:.3f}"
        t = s['test']
        lines.append(f"| `{row}` | {sees} | **{t['mean']:.3f}** | {t['min']:.3f} | {t['max']:.3f} | {t['n']} | "
                     f"{s['valid']['mean']:.3f} | {ref} | {s['wall_minutes']:.1f} min |")
    for kind, title in (('distance', 'words from the print back to the assignment'),
                        ('changed_by', 'statement that last changed the variable')):
        names = list(next(iter(summary.values()))[kind])
        first = next(iter(summary.values()))[kind]
        lines += ['', f'Test accuracy by {title} (prints in each):', '',
                  '| row | ' + ' | '.join(f"{n} ({first[n]['prints']:,})" for n in names) + ' |',
                  '|---|' + '---:|' * len(names)]
        for row, s in summary.items():
            lines.append(f'| `{row}` | ' + ' | '.join(f"{s[kind][n]['accuracy']:.3f}" for n in names) + ' |')
    return '\n'.join(lines)


def plot(results: List[Dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = new_figure()
    colors: Dict[str, Any] = {}
    for r in results:
        steps = [0] + [h['step'] for h in r['curve']]
        line, = ax.plot(steps, [float('nan')] + [h['valid_accuracy'] for h in r['curve']], 'o-', markersize=3,
                        color=colors.get(r['row']), label=None if r['row'] in colors else f"{r['row']} (valid)")
        colors[r['row']] = line.get_color()
        if 'test_accuracy' in r:
            ax.plot([r['steps']], [r['test_accuracy']], '*', markersize=10, color=line.get_color())
    ax.axhline(0.1, color='gray', linestyle=':', label='chance (0.10)')
    ax.set_xlabel('training step (stars: test accuracy at the end)')
    ax.set_ylabel('accuracy on print positions')
    ax.set_ylim(0, 1.02)
    save_figure(fig, ax, path, title)


def search(args: argparse.Namespace, rows: List[str]) -> None:
    """Every row over the preset's grid, validation only; prints and writes each row's best setting."""
    grid = PRESETS[args.preset]['search']
    keys = list(grid)
    combos: List[List[str]] = [[]]
    for key in keys:
        combos = [c + [f'{key}={v}'] for c in combos for v in grid[key]]
    jobs = [{'row': row, 'args': [*row_args(args.preset, row, []), *combo, 'evaluate_test=false',
                                  *args.overrides], 'combo': combo}
            for row in rows for combo in combos]
    tag = args.tag or f'state_tracking_{args.preset}_search'
    results = run_all(jobs, args.jobs, tag, args.out)
    best = {}
    for row in rows:
        mine = [(r['valid_accuracy'], j['combo']) for r, j in zip(results, jobs) if j['row'] == row]
        best[row] = max(mine, key=lambda m: m[0])
    (args.out / f'{tag}.json').write_text(json.dumps({'preset': args.preset, 'results': results}, indent=2))
    for row, (accuracy, combo) in best.items():
        print(f'{row}: {" ".join(combo)} (valid accuracy {accuracy:.3f})', flush=True)
    print(json.dumps({'best': {row: combo for row, (_, combo) in best.items()},
                      'valid_accuracy': {row: round(a, 4) for row, (a, _) in best.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--rows', nargs='+', help="rows of the preset to run (default: the preset's own)")
    parser.add_argument('--seeds', type=int, default=1, help='seeds a row (seed=5, 6, ...)')
    parser.add_argument('--search', action='store_true', help="the settings search (validation only)")
    parser.add_argument('--jobs', type=int, default=2, help='runs at the same time')
    parser.add_argument('--out', type=Path, default=Path('results'))
    parser.add_argument('--tag', default='', help='names the output files (default: the preset)')
    parser.add_argument('overrides', nargs='*', help='key=value configs for every run')
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    rows = args.rows or preset['default_rows']
    unknown = sorted(set(rows) - set(preset['rows']))
    if unknown:
        parser.error(f"--rows: {', '.join(unknown)} not in preset {args.preset} ({', '.join(preset['rows'])})")
    if args.seeds < 1:
        parser.error('--seeds must be >= 1')
    args.out.mkdir(parents=True, exist_ok=True)
    if args.search:
        search(args, rows)
        return
    if not can_plot():
        print(NO_MATPLOTLIB, flush=True)
    tag = args.tag or f'state_tracking_{args.preset}'
    start = time.perf_counter()
    jobs = [{'row': row, 'args': row_args(args.preset, row, args.overrides, seed=5 + i)}
            for i in range(args.seeds) for row in rows]
    # The longest runs first, so that the last ones to start are short (a wide window costs the most per step:
    # the full-view rows take about as long as the three others together)
    jobs.sort(key=lambda j: -int(settings_of(j['args']).get('memory_span', 0)))
    results = run_all(jobs, args.jobs, tag, args.out)
    total = time.perf_counter() - start
    words = program_words(jobs[0]['args'])
    summary = summarize(results, rows)
    variables = int(settings_of(jobs[0]['args'])['variables'])
    header = (f"Preset `{args.preset}` ({' '.join(preset['all'] + args.overrides)}), {args.seeds} seed(s) a row; "
              f"the longest test program has {words} words; commit {commit()}; {total / 60:.1f} min in all\n\n")
    md = tables(summary, words, variables)
    (args.out / f'{tag}.md').write_text(header + md + '\n')
    (args.out / f'{tag}.json').write_text(json.dumps({'preset': args.preset, 'summary': summary,
                                                      'program_words': words, 'results': results}, indent=2))
    if can_plot():
        plot(results, args.out / f'{tag}.png', header.strip())
    print(header + md, flush=True)
    print(json.dumps({'accuracy': {row: round(s['test']['mean'], 4) for row, s in summary.items()},
                      'accuracy_seeds': {row: [round(r['test_accuracy'], 4) for r in results if r['row'] == row]
                                         for row in rows},
                      'visible_words': {row: s['visible_words'] for row, s in summary.items()},
                      'program_words': words,
                      'distance': {row: {n: round(c['accuracy'], 4) for n, c in s['distance'].items()}
                                   for row, s in summary.items()},
                      'changed_by': {row: {n: round(c['accuracy'], 4) for n, c in s['changed_by'].items()}
                                     for row, s in summary.items()},
                      'settings': {row: ' '.join(row_args(args.preset, row, args.overrides)) for row in rows},
                      'commit': commit(),
                      'wall_seconds': {**{row: round(s['wall_minutes'] * 60, 1) for row, s in summary.items()},
                                       'total': round(total, 1)}}))


if __name__ == '__main__':
    main()
