"""
The results page is what the records say: `experiments/results_page.py` builds it (and its Korean edition, and the
README's figures) from the JSON records of `experiments/record.py`, and the committed page is current.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'experiments'))
sys.path.insert(0, str(ROOT / 'docs' / '_generator'))

import results_page  # noqa: E402
from docgen.markup import math_segments  # noqa: E402
from docgen.source import parse_markdown, section_keys  # noqa: E402

FIXTURES = ROOT / 'tests' / 'repository' / 'fixtures' / 'results'


def test_the_committed_page_and_readme_figures_are_current():
    result = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'results_page.py'), '--check'],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_page_shows_the_stored_records_figures():
    records = results_page.load_records(FIXTURES)
    english, _ = results_page.page(records)
    st = records['state_tracking_cpu_fixture']['result']
    for row, seeds in st['accuracy_seeds'].items():
        # The row's mean, min and max over its seeds, as the table prints them
        mean = sum(seeds) / len(seeds)
        line = next(line for line in english.splitlines() if line.startswith(f'| `{row}` |') and 'statements' in line)
        assert f'**{mean:.3f}** | {min(seeds):.3f}-{max(seeds):.3f} | {len(seeds)} |' in line, line
    # Where and how it was made, stated once
    record = records['state_tracking_cpu_fixture']
    section = english.split('## State tracking', 1)[1].split('\n## ', 1)[0]
    assert section.count(f"commit `{record['commit']}`") == 1 and record['command'] in section
    assert section.count(record['machine']['cpu']) == 1
    speed = records['speed_fixture']['result']['results']
    for r in speed:
        assert f"{r['tokens_per_s']:,.0f}" in english


def test_the_korean_edition_translates_every_section_and_keeps_the_math():
    english, korean = results_page.page(results_page.load_records(FIXTURES))
    doc = parse_markdown(english)
    entries = yaml.safe_load(korean)['entries']
    sections = {e['key']: e for e in entries}
    keys = section_keys(doc.sections)
    assert sorted(sections) == sorted(['title', 'summary', *keys])
    for key, section in zip(keys, doc.sections):
        assert sections[key]['en'] == section.note
        assert math_segments(sections[key]['ko']) == math_segments(section.note)
        assert sections[key]['ko'] != section.note, key


def test_readme_blocks_take_the_same_figures():
    records = results_page.load_records(FIXTURES)
    text = '# x\n\n<!-- results:state_tracking -->\nold\n<!-- /results:state_tracking -->\n\nafter\n'
    new = results_page.with_blocks(text, results_page.readme_blocks(records))
    assert 'old' not in new and new.endswith('<!-- /results:state_tracking -->\n\nafter\n')
    seeds = records['state_tracking_cpu_fixture']['result']['accuracy_seeds']['feedback_transformer_kv']
    assert f'**{sum(seeds) / len(seeds):.3f}**' in new
    # Applying it twice changes nothing
    assert results_page.with_blocks(new, results_page.readme_blocks(records)) == new


def test_fixtures_are_records():
    for path in FIXTURES.glob('*.json'):
        record = json.loads(path.read_text())
        assert {'command', 'started', 'commit', 'machine', 'result'} <= set(record), path
