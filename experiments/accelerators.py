"""
Measure the paper's four accelerators and write the README table.

    python experiments/accelerators.py                 # all four parts, then the table
    python experiments/accelerators.py --part carry    # one part (span, carry, curriculum, init); runs can go
                                                       # in parallel, each writes results/accelerators_<part>.json
    python experiments/accelerators.py --table         # the table from the parts' JSON files

* `span`: generation cost (tokens/s of the CPU time of one thread) around token 10 and token 1,000, with and
  without `memory_span`, in-process on random weights.
* `carry`: the whole-validation-set loss after the same steps with `carry_memory=True` and `False`.
* `curriculum`: training seconds until the validation loss first reaches a fixed value, with a sequence-length
  curriculum and with a constant `seq_len`.
* `init`: the validation loss at step 0 and after N steps of a feedback model initialized from a trained
  `model=transformer` run, and from random weights.

Training runs are `python -m labml_nn.transformers.feedback.experiment` subprocesses (as `compare_models.py`);
`results/accelerators.md` gets the table with the configs and the commit.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from runs import commit, run_and_load

OUT = Path('results')
# A small model and plain Adam: a few minutes per run on a busy 2-core machine
COMMON = ['d_model=128', 'heads=4', 'd_ff=256', 'n_layers=2', 'batch_size=16', 'epochs=1', 'dropout=0.0',
          'optimizer.optimizer=Adam', 'optimizer.learning_rate=0.002', 'sample_tokens=0', 'num_threads=1']
# The first measurements (before `memory_norm` and `recency_init`, which these settings now switch off): 300 steps
OLD = ['memory_norm=false', 'recency_init=false']
CARRY = [*COMMON, *OLD, 'model=feedback_transformer_kv', 'seq_len=32', 'memory_span=32', 'train_steps=300',
         'inner_iterations=2']
# Short segments and a longer span: without the carried memory a step sees at most 15 earlier tokens
CARRY_SHORT = [*[a for a in COMMON if not a.startswith('batch_size=')], *OLD, 'batch_size=32',
               'model=feedback_transformer_kv', 'seq_len=16', 'memory_span=64', 'train_steps=300',
               'inner_iterations=2']
# 49 validations of 2 batches each, one every 20 steps
CURRICULUM = [*COMMON, 'model=feedback_transformer_kv', 'seq_len=64', 'train_steps=300', 'inner_iterations=49',
              'valid_batches=98']
CURRICULUM_STAGES = '16:0,32:0.25,64:0.5'
# The fixed validation losses to reach (on a 2-batch share of the validation set, taken every 20 steps)
CURRICULUM_TARGETS = (2.3, 2.2, 2.1)
PRETRAIN = [*COMMON, 'model=transformer', 'seq_len=32', 'train_steps=400', 'inner_iterations=2',
            'valid_batches=40']
INIT = [*COMMON, 'model=feedback_transformer_kv', 'seq_len=32', 'train_steps=150', 'inner_iterations=3',
        'valid_batches=40', 'validate_at_start=true']


def train(args: List[str], tag: str) -> Dict[str, Any]:
    """One training run in a subprocess; its checkpoint's progress and history."""
    uuid = f'acc_{tag}_{int(time.time())}'
    model = next(a.split('=', 1)[1] for a in args if a.startswith('model='))
    payload, wall = run_and_load('labml_nn.transformers.feedback.experiment', args, model, uuid)
    return {'run': uuid, 'args': args, 'wall_seconds': wall, 'progress': payload['progress'],
            'history': payload['history']}


def generation_cost(memory_span: Optional[int], n_tokens: int = 1040, window: int = 32) -> Dict[str, float]:
    """Tokens/s (CPU time of this thread) of one-token steps in windows around token 10 and token 1,000."""
    from labml_nn.transformers.feedback.build import ModelConfig, build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig('feedback_transformer_kv', n_vocab=65, d_model=128, heads=4, d_ff=256,
                                    n_layers=4, memory_span=memory_span)).eval()
    tokens = torch.randint(65, (n_tokens, 1))
    seconds = []
    state = None
    # The model is built outside inference mode (its parameters stay ordinary tensors), and run inside it
    with torch.inference_mode():
        for t in range(n_tokens):
            start = time.thread_time()
            _, state = model(tokens[t:t + 1], state=state, return_state=True)
            seconds.append(time.thread_time() - start)
    # Steps `centre - window / 2 .. centre + window / 2 - 1`, around token 10 the first `window` steps
    early = seconds[1:1 + window]
    late = seconds[1000 - window // 2:1000 + window // 2]
    return {'tokens_per_second_10': len(early) / sum(early), 'tokens_per_second_1000': len(late) / sum(late),
            'cached_steps': state.visible.shape[4]}


def part_span() -> Dict[str, Any]:
    torch.set_num_threads(1)
    # Warm up the allocator and kernels once
    generation_cost(64)
    return {'unlimited': generation_cost(None), 'span_64': generation_cost(64)}


def side_by_side(runs: Dict[str, List[str]]) -> Dict[str, Any]:
    """Train the runs at the same time, so that they share whatever else loads the machine alike."""
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {tag: pool.submit(train, args, tag) for tag, args in runs.items()}
        return {tag: future.result() for tag, future in futures.items()}


def part_carry(args: List[str] = CARRY) -> Dict[str, Any]:
    return side_by_side({mode: [*args, f'carry_memory={mode == "carry"}'] for mode in ('carry', 'shuffled')})


def part_carry_short() -> Dict[str, Any]:
    return part_carry(CARRY_SHORT)


# Memory carried over several thousand steps: 512 tokens a step (`batch_size` x `seq_len`), a memory span of 64,
# the builder's defaults (`memory_norm`, `recency_init`), 4,000 steps (about two epochs of streams)
LONG = [*[a for a in COMMON if not a.startswith(('batch_size=', 'epochs='))], 'model=feedback_transformer_kv',
        'memory_span=64', 'train_steps=4000', 'epochs=3', 'inner_iterations=10']
SEGMENTS = {8: ['batch_size=64', 'seq_len=8'], 16: ['batch_size=32', 'seq_len=16']}


def part_carry_long8() -> Dict[str, Any]:
    """Segments of 8 tokens: without carried memory a step sees at most 7 earlier tokens."""
    return part_carry([*LONG, *SEGMENTS[8]])


def part_carry_long16() -> Dict[str, Any]:
    return part_carry([*LONG, *SEGMENTS[16]])


def part_carry_long16_no_recency() -> Dict[str, Any]:
    """Without `recency_init`: attention starts even over the 64 carried memory vectors."""
    return part_carry([*LONG, *SEGMENTS[16], 'recency_init=false'])


def part_carry_long8_no_norm() -> Dict[str, Any]:
    """Without `memory_norm`: carried memory only (the same setting without carrying is the first part's)."""
    return {'carry': train([*LONG, *SEGMENTS[8], 'memory_norm=false', 'carry_memory=true'], 'carry')}


def part_curriculum() -> Dict[str, Any]:
    return side_by_side({'curriculum': [*CURRICULUM, f'seq_len_curriculum={CURRICULUM_STAGES}'],
                         'constant': CURRICULUM})


def part_init() -> Dict[str, Any]:
    pretrained = train(PRETRAIN, 'pretrain')
    return {'pretrained': pretrained, 'init_from': train([*INIT, f"init_from={pretrained['run']}"], 'init_from'),
            'random': train(INIT, 'random')}


PARTS = {'span': part_span, 'carry': part_carry, 'carry_short': part_carry_short, 'carry_long8': part_carry_long8,
         'carry_long16': part_carry_long16, 'carry_long16_no_recency': part_carry_long16_no_recency,
         'carry_long8_no_norm': part_carry_long8_no_norm, 'curriculum': part_curriculum,
         'init': part_init}


def seconds_to_reach(run: Dict[str, Any], target: float) -> Optional[float]:
    """Training seconds at the first validation (a share of the validation set) with loss <= `target`."""
    for v in run['history']['valid']:
        if v['loss'] <= target:
            return v['train_seconds']
    return None


def final_loss(run: Dict[str, Any]) -> str:
    """The last whole-validation loss, or the step where the training loss became NaN."""
    loss = run['history']['evaluations'][-1]['valid_loss']
    if loss == loss:
        return f'{loss:.3f}'
    step = next(h['step'] for h in run['history']['train'] if h['loss'] != h['loss'])
    return f'NaN (diverged at step {step})'


def table(results: Dict[str, Dict[str, Any]]) -> str:
    rows = ['| accelerator | setting | baseline | measured | baseline figure |', '|---|---|---|---:|---:|']
    if 'span' in results:
        u, s = results['span']['unlimited'], results['span']['span_64']
        rows.append(f"| memory span | `memory_span=64`: generation tokens/s at token 10 / token 1,000 | unlimited "
                    f"| {s['tokens_per_second_10']:,.0f} / {s['tokens_per_second_1000']:,.0f} "
                    f"| {u['tokens_per_second_10']:,.0f} / {u['tokens_per_second_1000']:,.0f} |")
    for part in ('carry', 'carry_short', 'carry_long8', 'carry_long8_no_norm', 'carry_long16',
                 'carry_long16_no_recency'):
        if part in results:
            c, b = results[part]['carry'], results[part].get('shuffled')
            keys = ('seq_len', 'memory_span', 'batch_size', 'memory_norm', 'recency_init')
            setting = ' '.join(a for a in c['args'] if a.split('=')[0] in keys)
            rows.append(f"| memory carried across batches | `carry_memory=True` ({setting}): valid loss after "
                        f"{c['progress']['step']} steps | `carry_memory=False` | {final_loss(c)} "
                        f"| {final_loss(b) if b else '(not run)'} |")
    if 'curriculum' in results:
        c, b = results['curriculum']['curriculum'], results['curriculum']['constant']
        fmt = lambda run: ' / '.join('-' if t is None else f'{t:.0f} s'
                                     for t in (seconds_to_reach(run, x) for x in CURRICULUM_TARGETS))
        targets = ' / '.join(f'{x:.1f}' for x in CURRICULUM_TARGETS)
        rows.append(f"| sequence-length curriculum | `seq_len_curriculum={CURRICULUM_STAGES}`: training time to "
                    f"valid loss {targets} | constant `seq_len=64` | {fmt(c)} | {fmt(b)} |")
        rows.append(f"| sequence-length curriculum | the same: whole-validation loss after {c['progress']['step']} "
                    f"steps, training time | constant `seq_len=64` | {final_loss(c)}, "
                    f"{c['progress']['train_seconds']:.0f} s | {final_loss(b)}, "
                    f"{b['progress']['train_seconds']:.0f} s |")
    if 'init' in results:
        i, r = results['init']['init_from'], results['init']['random']
        e_i, e_r = i['history']['evaluations'], r['history']['evaluations']
        rows.append(f"| init from a parallel transformer | `init_from=<model=transformer run>`: valid loss at "
                    f"step 0 / after {i['progress']['step']} steps | random initialization "
                    f"| {e_i[0]['valid_loss']:.3f} / {e_i[-1]['valid_loss']:.3f} "
                    f"| {e_r[0]['valid_loss']:.3f} / {e_r[-1]['valid_loss']:.3f} |")
    return '\n'.join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--part', choices=sorted(PARTS), action='append')
    parser.add_argument('--table', action='store_true', help='only write the table from earlier parts')
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    parts = [] if args.table else (args.part or list(PARTS))
    for name in parts:
        result = {'commit': commit(), **PARTS[name]()}
        (OUT / f'accelerators_{name}.json').write_text(json.dumps(result, indent=1))
    results = {name: json.loads((OUT / f'accelerators_{name}.json').read_text()) for name in PARTS
               if (OUT / f'accelerators_{name}.json').is_file()}
    md = table(results)
    commits = sorted({r['commit'] for r in results.values()})
    (OUT / 'accelerators.md').write_text(f"Commits: {', '.join(commits)}\n\n{md}\n")
    print(md)


if __name__ == '__main__':
    main()
