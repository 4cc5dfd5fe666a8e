"""
The results page: every measured figure of the project, in one place, made from the records that
`experiments/record.py` keeps (`experiments/results/<name>.json`, one run of one command each).

    python experiments/results_page.py            # writes labml_nn/results.md, its Korean edition, the README's figures
    python experiments/results_page.py --check    # exit 1 if any differs from what the records give

The page is a markdown page of the annotated docs (`docs/results.html`); its Korean edition is the translation
file `docs/_generator/translations/ko/results.md.yaml`, written here too, so neither language can drift from the
records; the README's figures (between `<!-- results:NAME -->` markers) come from the same records. Each table
says once which command made it, when, at which commit and on which machine; a section whose records are missing
is left out. `--figures` also draws `experiments/results/state_tracking_cpu.png` from the runs'
curves (`<name>.runs.json`, the scripts' own JSON files kept beside the records).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'docs' / '_generator'))
from docgen.source import split_at_headings  # noqa: E402

RESULTS = ROOT / 'experiments' / 'results'
PAGE = ROOT / 'labml_nn' / 'results.md'
KOREAN = ROOT / 'docs' / '_generator' / 'translations' / 'ko' / 'results.md.yaml'
# Paths as the page (in labml_nn/) sees them
FROM_PAGE = '../experiments/results'
# Every attempt at a faster training step, kept with the sources
SPEED_LOG = 'https://github.com/labml-feedback/labml_nn/blob/main/experiments/speed_log.md'
LOG = 'https://github.com/labml-feedback/labml_nn/blob/main/experiments/state_tracking_log.md'

Record = Dict[str, Any]
# A section of the page in both languages
Section = Tuple[str, str]

TITLE = ('Results', '결과')
SUMMARY = ('Every measured figure of the project in one place: state tracking, training and generation speed, '
           'quality on Tiny Shakespeare; each table from one run of one command.',
           '이 프로젝트에서 측정한 모든 수치를 한곳에 모았습니다: 상태 추적, 학습과 생성 속도, Tiny Shakespeare에서의 '
           '품질. 표마다 명령 하나를 한 번 실행한 결과입니다.')


def load_records(folder: Path) -> Dict[str, Record]:
    """Every record in `folder`, by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob('*.json'))
            if not p.name.endswith('.runs.json')}


def n(x: float, digits: int = 0) -> str:
    """A number with thousands separators."""
    return f'{x:,.{digits}f}'


def provenance(records: List[Record]) -> Section:
    """Which commands made a table, when, at which commit, on which machine (stated once where all agree)."""
    en, ko = [], []
    for r in records:
        dirty = ' (with uncommitted changes)' if r.get('uncommitted_changes') else ''
        dirty_ko = ' (커밋되지 않은 변경 포함)' if r.get('uncommitted_changes') else ''
        en.append(f"`{r['command']}`: {r['started']}, {r['minutes']} min, commit `{r['commit']}`{dirty}")
        ko.append(f"`{r['command']}`: {r['started']}, {r['minutes']} min, 커밋 `{r['commit']}`{dirty_ko}")
    machines = {json.dumps(r['machine'], sort_keys=True) for r in records}
    m = records[0]['machine']
    where = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}" + (
        f", {m['cuda']}" if m.get('cuda') else '')
    lines_en = '\n'.join(f'* {line}' for line in en)
    lines_ko = '\n'.join(f'* {line}' for line in ko)
    if len(machines) == 1:
        return (f'Made by\n\n{lines_en}\n\non {where}.', f'만든 명령\n\n{lines_ko}\n\n실행한 기계: {where}.')
    return f'Made by\n\n{lines_en}', f'만든 명령\n\n{lines_ko}'


# ## State tracking

# Rows in reading order, with what they are
ROWS = {
    'feedback_transformer_kv': ('Feedback Transformer (shared keys/values), 2 layers',
                                '피드백 트랜스포머 (키/값 공유), 2층'),
    'feedback_transformer': ('Feedback Transformer, 2 layers', '피드백 트랜스포머, 2층'),
    'transformer_window': ('parallel transformer, 4 layers, window 8', '병렬 트랜스포머, 4층, 윈도 8'),
    'transformer_full': ('parallel transformer, 4 layers, window 512', '병렬 트랜스포머, 4층, 윈도 512'),
    'transformer_full_train100': ('the same, trained on 100-statement programs',
                                  '같은 모델, 100문장 프로그램으로 학습'),
}


def state_tracking_rows(records: List[Record]) -> Dict[str, Dict[str, Any]]:
    """Every row of every state-tracking record: its seeds' accuracies and breakdowns."""
    rows: Dict[str, Dict[str, Any]] = {}
    for r in records:
        res = r['result']
        for row, seeds in res['accuracy_seeds'].items():
            settings = dict(a.split('=', 1) for a in res['settings'][row].split())
            rows[row] = {'seeds': seeds, 'visible': res['visible_words'][row], 'words': res['program_words'],
                         'distance': res['distance'][row], 'changed_by': res['changed_by'][row],
                         'train_statements': settings['train_statements'], 'wall': res['wall_seconds'][row],
                         'rate': settings.get('optimizer.learning_rate'), 'warmup': settings.get('optimizer.warmup')}
    return {row: rows[row] for row in [*ROWS, *sorted(set(rows) - set(ROWS))] if row in rows}


def sees(row: Dict[str, Any]) -> Tuple[str, str]:
    v, words = row['visible'], row['words']
    if v is None:
        return 'all earlier words (recurrence)', '앞의 모든 단어 (재귀)'
    if v >= words:
        return f'{v} words: whole programs', f'{v}단어: 프로그램 전체'
    return f'the last {v} words', f'마지막 {v}단어'


def state_tracking(records: Dict[str, Record]) -> List[Section]:
    mine = [r for name, r in records.items() if name.startswith('state_tracking_cpu')]
    if not mine:
        return []
    rows = state_tracking_rows(mine)
    words = next(iter(rows.values()))['words']
    head_en = ('<a id="state-tracking"></a>\n\n## State tracking: one variable\n\n'
               "The paper's algorithmic task ([the task](tasks/state_tracking.html)): read a program one word at a "
               'time and say the value of the variable at every `print`. Models train on programs of 20 statements '
               f'and are tested once, at the end of each run, on 500 held-out programs of 100 statements (at most '
               f'{words} words); settings were chosen on validation accuracy only '
               f'([the log]({LOG}) has every run). Chance is 0.10.')
    head_ko = ('<a id="state-tracking"></a>\n\n## 상태 추적: 변수 하나\n\n'
               '논문의 알고리즘 과제입니다 ([과제](tasks/state_tracking.html)): 프로그램을 한 단어씩 읽고 `print`마다 '
               '변수의 값을 말합니다. 모델은 20문장 프로그램으로 학습하고, 실행이 끝날 때 한 번, 따로 떼어 둔 100문장 '
               f'프로그램 500개 (최대 {words}단어)로 테스트합니다. 설정은 검증 정확도로만 골랐습니다 '
               f'([기록]({LOG})에 모든 실행이 있습니다). 무작위 추측은 0.10입니다.')
    # What each row is and how it was trained, as a list above the table (the table stays narrow enough for a
    # page's column)
    legend_en = [f"* `{name}`: {ROWS.get(name, (name, name))[0]}; rate {row['rate']}, warm-up {row['warmup']}, "
                 f"{row['wall'] / 60:.0f} min a run" for name, row in rows.items()]
    legend_ko = [f"* `{name}`: {ROWS.get(name, (name, name))[1]}; 학습률 {row['rate']}, 워밍업 {row['warmup']}, "
                 f"실행당 {row['wall'] / 60:.0f}분" for name, row in rows.items()]
    table_en = ['| model | sees without recurrence | trained on | test, mean | min-max | seeds |',
                '|---|---|---|---:|---|---:|']
    table_ko = ['| 모델 | 재귀 없이 보는 범위 | 학습 프로그램 | 테스트, 평균 | 최소-최대 | 시드 |',
                '|---|---|---|---:|---|---:|']
    for name, row in rows.items():
        s = row['seeds']
        see = sees(row)
        cells = f"**{statistics.fmean(s):.3f}** | {min(s):.3f}-{max(s):.3f} | {len(s)} |"
        table_en.append(f"| `{name}` | {see[0]} | {row['train_statements']} statements | {cells}")
        table_ko.append(f"| `{name}` | {see[1]} | {row['train_statements']}문장 | {cells}")
    table_en = legend_en + [''] + table_en
    table_ko = legend_ko + [''] + table_ko
    breakdown_en, breakdown_ko = [], []
    first = next(iter(rows.values()))
    for kind, en, ko in (('distance', 'words from the print back to the assignment',
                          'print에서 대입까지의 단어 수'),
                         ('changed_by', 'the statement that last changed the variable',
                          '변수를 마지막으로 바꾼 문장')):
        names = list(first[kind])
        header = '| model | ' + ' | '.join(f'`{x}`' for x in names) + ' |'
        rule = '|---|' + '---:|' * len(names)
        body = [f'| `{name}` | ' + ' | '.join(f'{row[kind][x]:.3f}' for x in names) + ' |'
                for name, row in rows.items()]
        breakdown_en += ['', f'Test accuracy by {en} (mean over seeds):', '', header, rule, *body]
        breakdown_ko += ['', f'{ko}에 따른 테스트 정확도 (시드 평균):', '',
                         header.replace('| model |', '| 모델 |'), rule, *body]
    prov = provenance(mine)
    figure = RESULTS / 'state_tracking_cpu.png'
    image = (f'\n\n![Validation accuracy on the print positions against training steps, every run]'
             f'({FROM_PAGE}/state_tracking_cpu.png)') if figure.exists() else ''
    image_ko = (f'\n\n![학습 단계에 따른 print 위치의 검증 정확도, 모든 실행]'
                f'({FROM_PAGE}/state_tracking_cpu.png)') if figure.exists() else ''
    return [(head_en + '\n\n' + '\n'.join(table_en) + '\n'.join(['', *breakdown_en]) + image + '\n\n' + prov[0],
             head_ko + '\n\n' + '\n'.join(table_ko) + '\n'.join(['', *breakdown_ko]) + image_ko + '\n\n' + prov[1])]


def more_variables(records: Dict[str, Record]) -> List[Section]:
    """Runs with more than one variable (records `state_tracking_vars*`): the recipe and the test accuracy."""
    mine = [r for name, r in records.items() if name.startswith('state_tracking_vars')]
    if not mine:
        return []
    body = []
    for r in mine:
        res = r['result']
        for row, seeds in res['accuracy_seeds'].items():
            s = dict(a.split('=', 1) for a in res['settings'][row].split())
            steps = int(s['epochs']) * int(s['epoch_segments'])
            body.append(f"| {s['variables']} | `{row}` | {s['train_statements']} | {n(steps)} | "
                        f"{s.get('optimizer.learning_rate')}, {s.get('optimizer.warmup')} | {seeds_cell(seeds)} |")
    rule = '|---:|---|---:|---:|---|---|'
    en = ['<a id="more-variables"></a>', '', '## State tracking: more variables', '',
          'The same task with two or three variables (the paper\'s setting is three), trained longer than one '
          'variable needs, with the one-variable settings; test accuracy on held-out 100-statement programs, read '
          'once at the end.', '',
          '| variables | model | training statements | steps | rate, warm-up | test accuracy |', rule, *body]
    ko = ['<a id="more-variables"></a>', '', '## 상태 추적: 변수 여러 개', '',
          '같은 과제를 변수 두 개나 세 개로 (논문의 설정은 세 개), 변수 하나에 필요한 것보다 길게, '
          '변수 하나의 설정으로 학습했습니다. 따로 떼어 둔 100문장 프로그램에서, '
          '끝에 한 번 읽은 테스트 정확도입니다.', '',
          '| 변수 | 모델 | 학습 프로그램 문장 수 | 단계 | 학습률, 워밍업 | 테스트 정확도 |', rule, *body]
    prov = provenance(mine)
    return [('\n'.join(en) + '\n\n' + prov[0], '\n'.join(ko) + '\n\n' + prov[1])]


# ## Speed

MODEL_NAMES = {'parallel': 'parallel `nn.TransformerEncoder`', 'transformer': 'parallel `transformer` (ours)'}


def size_of(config: Dict[str, Any]) -> str:
    return (f"d{config['d_model']}, {config['heads']} heads, d_ff {config['d_ff']}, {config['n_layers']} layers, "
            f"seq {config['seq_len']}, batch {config['batch']}, {config['threads']} threads, {config['precision']}")


class Column(NamedTuple):
    """A column of the training-speed tables: its result key, headers, and how a value is written."""
    key: str
    en: str
    ko: str
    fmt: Callable[[Any], str]
    # The README's header (`None`: not in the README's table), and its cell where a row has no value
    readme: Optional[str] = None
    readme_missing: str = ''


SPEED_COLUMNS = [
    Column('tokens_per_s', 'tokens/s', '토큰/초', lambda v: n(v), 'tokens/s'),
    # The parallel model has no slowdown of its own: 1.00x in the README
    Column('slowdown_vs_parallel', 'time per token vs parallel', '병렬 대비 토큰당 시간', lambda v: f'{v:.2f}x',
           'time per token vs parallel', '1.00x'),
    Column('floor_tokens_per_s', 'floor tokens/s', '하한 토큰/초', lambda v: n(v)),
    Column('fraction_of_floor', 'fraction of its floor', '하한 대비 비율', lambda v: f'{v:.0%}',
           'of its arithmetic floor'),
    Column('floor_vs_parallel', 'floor vs parallel step', '하한 / 병렬 단계', lambda v: f'{v:.2f}x',
           'its floor vs parallel'),
    Column('peak_mb', 'peak MB', '최대 MB', lambda v: n(v)),
]


def speed_rows(results: List[Dict[str, Any]], cols: List[Column], readme: bool = False) -> List[str]:
    """The rows of a training-speed table with columns `cols` (with the README's empty cells if `readme`)."""
    def cell(x: Dict[str, Any], c: Column) -> str:
        return c.fmt(x[c.key]) if c.key in x else (c.readme_missing if readme else '')
    return [f"| {MODEL_NAMES.get(x['model'], '`' + x['model'] + '`')} | " + ' | '.join(cell(x, c) for c in cols)
            + ' |' for x in results]


def speed(records: Dict[str, Record]) -> List[Section]:
    # The README's size first, then labml_nn's; fp32 before bf16
    order = ['speed_small', 'speed_small_bf16', 'speed_labml', 'speed_labml_bf16']
    names = sorted((k for k in records if k.startswith('speed_')), key=lambda k: (order + [k]).index(k))
    mine = [records[k] for k in names]
    if not mine:
        return []
    en = ['<a id="training-speed"></a>', '', '## Training speed and memory', '',
          '`experiments/benchmark.py`: a full training step (forward, cross-entropy, backward, gradient clipping, '
          'Adam) on random tokens, the models taking turns step by step; medians.']
    ko = ['<a id="training-speed"></a>', '', '## 학습 속도와 메모리', '',
          '`experiments/benchmark.py`: 무작위 토큰으로 학습 한 단계 전체 (순전파, 교차 엔트로피, 역전파, 그래디언트 '
          '클리핑, Adam)를 모델이 한 단계씩 번갈아 재고, 중앙값을 냅니다.']
    for r in mine:
        res = r['result']
        cols = [c for c in SPEED_COLUMNS if any(c.key in x for x in res['results'])]
        header_en = '| model | ' + ' | '.join(c.en for c in cols) + ' |'
        header_ko = '| 모델 | ' + ' | '.join(c.ko for c in cols) + ' |'
        rule = '|---|' + '---:|' * len(cols)
        body = speed_rows(res['results'], cols)
        prov = provenance([r])
        en += ['', f"### {size_of(res['config'])}", '', header_en, rule, *body, '', prov[0]]
        ko += ['', f"### {size_of(res['config'])}", '', header_ko, rule, *body, '', prov[1]]
    return [('\n'.join(en), '\n'.join(ko))]


def generation(records: Dict[str, Record]) -> List[Section]:
    mine = [r for name, r in records.items() if name.startswith('generation')]
    if not mine:
        return []
    names = {'weighted': '`FeedbackTransformer`', 'kv': '`FeedbackTransformerKV`',
             'baseline': '`CausalTransformer` (key/value cache)'}
    en = ['<a id="generation-speed"></a>', '', '## Generation speed']
    ko = ['<a id="generation-speed"></a>', '', '## 생성 속도']
    for r in mine:
        res, c = r['result'], r['result']['config']
        setting = (f"d{c['d_model']}, {c['heads']} heads, d_ff {c['d_ff']}, {c['n_layers']} layers, {c['tokens']} new "
                   f"tokens from a {c['prompt_len']}-token prompt, {c['threads']} threads, median of {c['repeats']} "
                   f"({c['clock']} clock)")
        entries = [(v, k[6:], e) for v, per in res['results'].items() for k, e in per.items() if k.startswith('batch_')]
        if any('eager_cached' in e for _, _, e in entries):
            # Only the ratio: the absolute tokens/s of eager generation are the other record's (one figure, one place)
            head_en = (f"`generate()` compiled (`compile={c['compile']}`: one compiled call per token) against "
                       f"eager, the same weights, both measured in this run, their repeats taking turns; {setting}. "
                       "Compile seconds: the first generation, compiling included. Only ratios: this machine's speed "
                       'drifts over minutes, so the tokens/s of runs minutes apart do not compare.')
            head_ko = (f"컴파일한 `generate()` (`compile={c['compile']}`: 토큰마다 컴파일된 호출 한 번)와 eager를 "
                       f"같은 가중치로, 같은 실행 안에서 반복을 번갈아 가며 비교합니다. {setting}. 컴파일 초: "
                       '컴파일을 포함한 첫 생성. 비율만 보입니다. 이 기계의 속도는 몇 분 사이에도 달라지므로, 몇 분 '
                       '떨어진 실행들의 토큰/초는 서로 비교할 수 없습니다.')
            table = ['|---|---:|---:|---:|'] + [
                f"| {names.get(v, v)} | {b} | {e['compiled_over_eager']:.2f}x | {e['compile_s']:.0f} |"
                for v, b, e in entries if 'eager_cached' in e]
            header_en = '| model | batch | compiled / eager tokens/s | compile s |'
            header_ko = '| 모델 | 배치 | 컴파일 / eager 토큰/초 | 컴파일 초 |'
        else:
            head_en = (f"`generate()` from the cached state (one step per new token) against re-running the prefix for "
                       f"every token (what labml_nn's sampling does); {setting}.")
            head_ko = (f"캐시한 상태에서 새 토큰마다 한 단계를 도는 `generate()`와, 토큰마다 접두사를 다시 돌리는 방식 "
                       f"(labml_nn의 샘플링)을 비교합니다. {setting}.")
            table = ['|---|---:|---:|---:|---:|'] + [
                f"| {names.get(v, v)} | {b} | {n(e['cached'])} | "
                + (f"{e['full']:,.1f} | {e['cached'] / e['full']:,.0f}x |" if e.get('full') else ' | |')
                for v, b, e in entries]
            header_en = '| model | batch | cached tokens/s | full re-computation tokens/s | speed-up |'
            header_ko = '| 모델 | 배치 | 캐시 토큰/초 | 전체 재계산 토큰/초 | 속도 향상 |'
        prov = provenance([r])
        en += ['', head_en, '', header_en, *table, '', prov[0]]
        ko += ['', head_ko, '', header_ko, *table, '', prov[1]]
    return [('\n'.join(en), '\n'.join(ko))]


def compiled_training(records: Dict[str, Record]) -> List[Section]:
    r = records.get('training_compiled')
    if not r:
        return []
    res, c = r['result'], r['result']['config']
    setting = (f"d{c['d_model']}, {c['heads']} heads, d_ff {c['d_ff']}, {c['n_layers']} layers, seq {c['seq_len']}, "
               f"batch {c['batch']}, {c['threads']} threads, fp32, median of {c['repeats']}")
    en = ['<a id="compiled-training"></a>', '', '## A compiled training step', '',
          '`experiments/benchmark_compiled_training.py`: the step loop alone (forward, then backward from a fixed '
          'output gradient), the fused loop with its hand-written backward against the fixed-shape step compiled by '
          '`torch.compile` with the backward AOTAutograd derives, with inductor\'s Python (`compiled`) or C++ '
          '(`compiled-cpp`) wrapper, and against the fused loop with its own step functions compiled, forward and '
          'hand-written backward, with symbolic sizes (`compiled-steps`, [one step, one function]('
          f'transformers/feedback/fused.html#steps)); the variants take turns; {setting}. Gradient '
          'difference: the largest, relative to the gradient\'s largest entry. The fixed-shape step\'s speed swings '
          f'from run to run (the [speed log]({SPEED_LOG}) keeps every run).']
    ko = ['<a id="compiled-training"></a>', '', '## 컴파일한 학습 단계', '',
          '`experiments/benchmark_compiled_training.py`: 단계 루프만 (순전파, 그리고 고정된 출력 그래디언트에서의 '
          '역전파) 잽니다. 손으로 쓴 역전파를 가진 융합 루프와, `torch.compile`이 컴파일하고 역전파는 '
          'AOTAutograd가 유도한 고정 모양 단계를 inductor의 Python (`compiled`) 또는 C++ (`compiled-cpp`) '
          '래퍼로 비교하고, 융합 루프의 스텝 함수(순전파와 손으로 쓴 역전파)를 기호 크기로 컴파일한 것 '
          '(`compiled-steps`, [한 스텝, 한 함수]('
          'transformers/feedback/fused.html#steps))과도 비교합니다. 변형들은 번갈아 '
          f'돕니다. {setting}. 그래디언트 차이: 그 그래디언트의 가장 큰 원소에 대한 가장 큰 차이. 고정 모양 단계의 '
          f'속도는 실행마다 크게 흔들립니다 ([속도 기록]({SPEED_LOG})에 모든 실행이 있습니다).']
    rows = [f"| `{x['model']}` | {x['variant']} | {x['forward_ms']:.1f} | {x['backward_ms']:.1f} | "
            f"{x['speedup_vs_fused']:.2f}x | " + (f"{x['compile_s']:.0f}" if 'compile_s' in x else '') + ' | '
            + (f"{x['max_grad_diff']:.0e}" if 'max_grad_diff' in x else '') + ' |' for x in res['results']]
    prov = provenance([r])
    en += ['', '| model | variant | forward ms | backward ms | speed vs fused | compile s | gradient difference |',
           '|---|---|---:|---:|---:|---:|---:|', *rows, '', prov[0]]
    ko += ['', '| 모델 | 변형 | 순전파 ms | 역전파 ms | 융합 대비 속도 | 컴파일 초 | 그래디언트 차이 |',
           '|---|---|---:|---:|---:|---:|---:|', *rows, '', prov[1]]
    return [('\n'.join(en), '\n'.join(ko))]


# ## Quality

def quality(records: Dict[str, Record]) -> List[Section]:
    r = records.get('quality_cpu')
    if r is None:
        return []
    res = r['result']
    body = [f"| `{m}` | {res['steps'][m]} | **{res['valid_loss'][m]:.3f}** | {res['valid_accuracy'][m]:.3f} | "
            f"{n(res['tokens_per_second'][m])} | {res['wall_seconds'][m] / 60:.1f} |" for m in res['valid_loss']]
    rule = '|---|---:|---:|---:|---:|---:|'
    table_en = ['| model | steps | valid loss | valid accuracy | training tokens/s | minutes |', rule, *body]
    table_ko = ['| 모델 | 단계 | 검증 손실 | 검증 정확도 | 학습 토큰/초 | 분 |', rule, *body]
    image = RESULTS / 'quality_cpu.png'
    plot_en = f'\n\n![Training and validation loss of the three models]({FROM_PAGE}/quality_cpu.png)' \
        if image.exists() else ''
    plot_ko = f'\n\n![세 모델의 학습 손실과 검증 손실]({FROM_PAGE}/quality_cpu.png)' if image.exists() else ''
    intro_en = ('`experiments/compare_models.py --preset cpu`: the three models trained with the README\'s CPU '
                f"recipe (`{res['settings']}`), each in its own process on the same data in the same order; the "
                'validation loss is over the whole validation set at the end.')
    intro_ko = ('`experiments/compare_models.py --preset cpu`: README의 CPU 레시피 '
                f"(`{res['settings']}`)로 세 모델을 각자의 프로세스에서 같은 데이터, 같은 순서로 학습했습니다. 검증 "
                '손실은 끝에서 검증 세트 전체로 잰 값입니다.')
    prov = provenance([r])
    anchor = '<a id="quality-on-tiny-shakespeare"></a>\n\n'
    return [(anchor + '## Quality on Tiny Shakespeare\n\n' + intro_en + '\n\n' + '\n'.join(table_en) + plot_en + '\n\n'
             + prov[0],
             anchor + '## Tiny Shakespeare에서의 품질\n\n' + intro_ko + '\n\n' + '\n'.join(table_ko) + plot_ko + '\n\n'
             + prov[1])]


# ## The README's figures: blocks between `<!-- results:NAME -->` and `<!-- /results:NAME -->`

README = ROOT / 'README.md'
RESULTS_LINK = 'docs/results.html'


def seeds_cell(seeds: List[float], lang: int = 0) -> str:
    mean = f'**{statistics.fmean(seeds):.3f}**'
    label = ['seeds', '시드'][lang]
    return mean if len(seeds) == 1 else f'{mean} ({min(seeds):.3f}-{max(seeds):.3f}, {len(seeds)} {label})'


def state_tracking_table(rows: Dict[str, Dict[str, Any]], lang: int) -> List[str]:
    """The short state-tracking table, in English (`lang=0`) or Korean (1)."""
    header = ['| model | sees without recurrence | trained on | test accuracy, mean (min-max) |',
              '| 모델 | 재귀 없이 보는 범위 | 학습 프로그램 | 테스트 정확도, 평균 (최소-최대) |'][lang]
    trained = ['{} statements', '{}문장'][lang]
    return [header, '|---|---|---|---|'] + [
        f"| `{name}` | {sees(row)[lang]} | {trained.format(row['train_statements'])} | "
        f"{seeds_cell(row['seeds'], lang)} |" for name, row in rows.items()]


# Pages of the docs that show a block: (source, its Korean translation file); the Korean gets the `_ko` block
DOC_BLOCKS = [(ROOT / 'labml_nn' / 'transformers' / 'feedback' / 'state_tracking.py',
               ROOT / 'docs' / '_generator' / 'translations' / 'ko' / 'transformers' / 'feedback' /
               'state_tracking.py.yaml')]


def with_doc_blocks(source: str, translation: str, blocks: Dict[str, str]) -> Tuple[str, str]:
    """A docs source and its translation file with their blocks filled: the English block in the source and in the
    translation's `en` (so the translation stays current), the Korean one in its `ko`."""
    import yaml
    data = yaml.safe_load(translation)
    korean = {k[:-3]: v for k, v in blocks.items() if k.endswith('_ko')}
    for entry in data['entries']:
        if '<!-- results:' in entry['en']:
            entry['en'] = with_blocks(entry['en'], blocks)
            entry['ko'] = with_blocks(entry['ko'], korean)
    head = translation.split('\n', 1)[0] + '\n'
    return with_blocks(source, blocks), head + yaml_entries(data['entries'])


# benchmark_generation.py's variants by the experiment's model names
GENERATION_MODELS = {'weighted': 'feedback_transformer', 'kv': 'feedback_transformer_kv', 'baseline': 'transformer'}


def readme_blocks(records: Dict[str, Record]) -> Dict[str, str]:
    blocks: Dict[str, List[str]] = {name: [] for name in (
        'headline', 'state_tracking', 'state_tracking_ko', 'state_tracking_figure', 'state_tracking_figure_ko',
        'state_tracking_figure_readme', 'speed')}
    rows = state_tracking_rows([r for k, r in records.items() if k.startswith('state_tracking_cpu')])
    head = blocks['headline']
    if rows:
        st = '; '.join(f"`{name}` {seeds_cell(row['seeds'])}" for name, row in rows.items())
        head.append(f'| state tracking, 1 variable: test accuracy on held-out 100-statement programs | {st} | '
                    '`experiments/state_tracking.py --preset cpu` |')
        blocks['state_tracking'] = state_tracking_table(rows, 0)
        blocks['state_tracking_ko'] = state_tracking_table(rows, 1)
        if (RESULTS / 'state_tracking_cpu.png').exists():
            # The figure, as the state-tracking page (two folders below the package) and the README see it
            blocks['state_tracking_figure'] = [
                '![Validation accuracy against training steps, every run](../../../experiments/results/'
                'state_tracking_cpu.png)']
            blocks['state_tracking_figure_ko'] = [
                '![학습 단계에 따른 검증 정확도, 모든 실행](../../../experiments/results/state_tracking_cpu.png)']
            blocks['state_tracking_figure_readme'] = [
                '![Validation accuracy against training steps, every run](experiments/results/state_tracking_cpu.png)']
    q = records.get('quality_cpu')
    if q:
        losses = ', '.join(f"`{m}` {v:.3f}" for m, v in q['result']['valid_loss'].items())
        head.append(f'| Tiny Shakespeare, the CPU recipe (1 epoch): validation loss | {losses} | '
                    '`experiments/compare_models.py --preset cpu` |')
    for name in ('speed_small', 'speed_labml'):
        if name not in records:
            continue
        res = records[name]['result']
        # The README's table: the models that trained, the columns the README keeps that a model has
        trained = [x for x in res['results'] if 'tokens_per_s' in x]
        cols = [c for c in SPEED_COLUMNS if c.readme and any(c.key in x for x in trained)]
        if not trained:
            continue
        blocks['speed'] += ['', f"Training, {size_of(res['config'])}:", '',
                            '| model | ' + ' | '.join(c.readme for c in cols) + ' |',
                            '|---|' + '---:|' * len(cols), *speed_rows(trained, cols, readme=True)]
        if name == 'speed_small':
            slow = ', '.join(f"`{x['model']}` {x['slowdown_vs_parallel']:.2f}x" for x in res['results']
                             if 'slowdown_vs_parallel' in x)
            head.append(f'| training step, d_model 128, 4 layers, 2 CPU threads: time per token vs the parallel '
                        f'transformer | {slow} | `experiments/benchmark.py` |')
    g = records.get('generation')
    if g:
        per = g['result']['results']
        cells = ', '.join(f"`{GENERATION_MODELS.get(v, v)}` {n(per[v]['batch_1']['cached'])}" for v in per
                          if 'batch_1' in per[v])
        head.append(f'| cached generation, batch 1: tokens/s | {cells} | `experiments/benchmark_generation.py` |')
    g = records.get('generation_compiled')
    if g:
        per = g['result']['results']
        cells = ', '.join(f"`{GENERATION_MODELS.get(v, v)}` {per[v]['batch_1']['compiled_over_eager']:.2f}x"
                          for v in per
                          if 'eager_cached' in per[v].get('batch_1', {}))
        head.append(f'| generation, batch 1, the compiled step (`compile=True`) over eager | {cells} | '
                    '`experiments/benchmark_generation.py --compile --compare-eager` |')
    if head:
        blocks['headline'] = ['| what | measured | command |', '|---|---|---|', *head]
    return {k: '\n'.join(v).strip() for k, v in blocks.items()}


def with_blocks(text: str, blocks: Dict[str, str]) -> str:
    """`text` with every `<!-- results:NAME -->` block's content replaced by `blocks[NAME]`."""
    for name, content in blocks.items():
        start, end = f'<!-- results:{name} -->', f'<!-- /results:{name} -->'
        if start not in text:
            continue
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + start + ('\n' + content if content else '') + '\n' + end + after
    return text


SECTIONS: List[Callable[[Dict[str, Record]], List[Section]]] = [state_tracking, more_variables, quality, speed,
                                                                   compiled_training, generation]


def page(records: Dict[str, Record]) -> Tuple[str, str]:
    """The English page (markdown with front matter) and its Korean translation file (YAML)."""
    intro = ('# Results\n\nEvery figure below is the output of one run of one command, recorded by '
             '`experiments/record.py` in `experiments/results/` and turned into this page by '
             '`experiments/results_page.py`: rerun a command the same way to check a figure. How each model works '
             'is in the [reading order](index.html).',
             '# 결과\n\n아래의 모든 수치는 명령 하나를 한 번 실행한 출력입니다. `experiments/record.py`가 '
             '`experiments/results/`에 기록하고 `experiments/results_page.py`가 이 페이지로 만듭니다. 같은 명령을 '
             '다시 실행하면 수치를 확인할 수 있습니다. 각 모델이 어떻게 동작하는지는 [읽는 순서](index.html)에 '
             '있습니다.')
    pairs = [intro] + [s for make in SECTIONS for s in make(records)]
    body_en, body_ko = ('\n\n'.join(p[i] for p in pairs) for i in (0, 1))
    # The generator cuts a page before every heading: a translation entry for each piece, cut the same way
    pieces = split_at_headings(body_en), split_at_headings(body_ko)
    if len(pieces[0]) != len(pieces[1]):
        raise ValueError('the Korean page has other headings than the English one')
    sections = list(zip(*pieces))
    import yaml
    front = '---\n' + yaml.safe_dump({'title': TITLE[0], 'summary': SUMMARY[0]}, sort_keys=False, width=116) + '---\n\n'
    english = front + body_en + '\n'
    entries = [{'key': 'title', 'en': TITLE[0], 'ko': TITLE[1]}, {'key': 'summary', 'en': SUMMARY[0], 'ko': SUMMARY[1]}]
    entries += [{'key': f'module+{i}', 'en': en, 'ko': ko} for i, (en, ko) in enumerate(sections)]
    return english, yaml_file(entries)


def yaml_entries(entries: List[Dict[str, str]]) -> str:
    """Translation entries as YAML, multi-line text as literal blocks (as the generator's templates write them)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: Any, value: str) -> Any:
        style = '|' if '\n' in value else None
        return dumper.represent_scalar('tag:yaml.org,2002:str', value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump({'entries': entries}, Dumper=Dumper, allow_unicode=True, sort_keys=False, width=120)


def yaml_file(entries: List[Dict[str, str]]) -> str:
    head = '# ko translation of labml_nn/results.md: written by experiments/results_page.py from the records.\n'
    return head + yaml_entries(entries)


def draw_state_tracking(folder: Path) -> Optional[Path]:
    """Validation accuracy against steps of every state-tracking run, one color a row."""
    sys.path.insert(0, str(Path(__file__).parent))
    from figure import can_plot, new_figure, save_figure
    runs = [r for p in sorted(folder.glob('state_tracking_cpu*.runs.json'))
            for r in json.loads(p.read_text())['results']]
    if not runs or not can_plot():
        return None
    fig, ax = new_figure()
    colors: Dict[str, Any] = {}
    for row in [r for r in ROWS if any(x['row'] == r for x in runs)]:
        for r in (x for x in runs if x['row'] == row):
            steps = [h['step'] for h in r['curve']]
            line, = ax.plot(steps, [h['valid_accuracy'] for h in r['curve']], 'o-', markersize=2, linewidth=1,
                            color=colors.get(row), label=None if row in colors else row)
            colors[row] = line.get_color()
    ax.axhline(0.1, color='gray', linestyle=':', label='chance (0.10)')
    ax.set_xlabel('training step')
    ax.set_ylabel('validation accuracy on print positions')
    ax.set_ylim(0, 1.02)
    path = folder / 'state_tracking_cpu.png'
    save_figure(fig, ax, path, 'State tracking, one variable: every run of the results page (one line a seed)')
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true', help='fail if the page is not what the records give')
    parser.add_argument('--figures', action='store_true', help='also draw the state-tracking figure')
    args = parser.parse_args(argv)
    if args.figures:
        draw_state_tracking(RESULTS)
    records = load_records(RESULTS)
    english, korean = page(records)
    blocks = readme_blocks(records)
    outputs = {PAGE: english, KOREAN: korean, README: with_blocks(README.read_text(), blocks)}
    for source, translation in DOC_BLOCKS:
        outputs[source], outputs[translation] = with_doc_blocks(source.read_text(), translation.read_text(), blocks)
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, text in outputs.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)} (run python experiments/results_page.py)", file=sys.stderr)
            return 1
        return 0
    for path, text in outputs.items():
        path.write_text(text)
    print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in outputs)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
