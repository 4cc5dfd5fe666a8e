"""
The README stays a page to start from: its two commands for a fresh machine are true (CI runs the test command
verbatim), it fits in 250 lines with a table of contents, and every Python block in it (and in the docs' "Using it")
runs as written.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    block = text.split('```bash', 1)[1].split('```', 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith('#')]


def test_readme_starts_with_main_and_test_commands():
    main, test = _readme_commands()[:2]
    assert main.startswith('pip install torch==2.13.0 -e .') and 'train_cpu.py' in main
    # The whole suite, slow tests included
    assert 'pytest' in test and '--run-slow' in test
    assert (ROOT / main.split('python ', 1)[1].split()[0]).exists()


def test_ci_runs_the_readme_test_command():
    test = _readme_commands()[1]
    ci = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()]
    assert test in ci


def test_ci_installs_into_a_fresh_virtual_environment():
    """CI sees dependency drift as a new user does: a new venv, without the system's site-packages."""
    ci = (ROOT / '.ci' / 'run').read_text()
    lines = [line.strip() for line in ci.splitlines() if not line.strip().startswith('#')]
    venv = [i for i, line in enumerate(lines) if line.startswith('python3 -m venv')]
    activate = [i for i, line in enumerate(lines) if line.startswith('. ') and 'bin/activate' in line]
    install = [i for i, line in enumerate(lines) if 'pip install' in line]
    assert venv and activate and install and venv[0] < activate[0] < install[0], lines
    assert 'system-site-packages' not in ci


def test_tests_and_files_the_readme_names_exist():
    """A test (`tests/...py::test_name`) or a repository file the README points at is there."""
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    for path, name in re.findall(r'`(tests/[\w/]+\.py)::(\w+)`', text):
        assert re.search(rf'^def {name}\(', (ROOT / path).read_text(), re.M), f'{path}::{name}'
    for path in re.findall(r'`((?:labml_nn|experiments|tests)/[\w/]+\.(?:py|md|sh))`', text):
        assert (ROOT / path).exists(), path
    # Relative links too (the docs' pages, the notebook, the log)
    for path in re.findall(r'\]\(((?!https?:|#)[^)#]+)', text):
        assert (ROOT / path).exists(), path


def test_readme_fits_a_screen_and_has_contents():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert len(text.splitlines()) <= 250
    headings = re.findall(r'^## (.+)$', text, re.M)
    assert headings[0] == 'Contents'
    contents = text.split('## Contents', 1)[1].split('\n## ', 1)[0]
    # Every section is in the contents, with GitHub's anchor for it
    for heading in headings[1:]:
        anchor = re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-')
        assert f'(#{anchor})' in contents, heading


def _python_blocks(text: str):
    return re.findall(r'```python(?: beside)?\n(.*?)```', text, re.S)


def _run(code: str, tmp_path: Path):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize('index', range(len(_python_blocks((ROOT / 'README.md').read_text(encoding='utf-8')))))
def test_readme_python_blocks_run(index: int, tmp_path: Path):
    """Each block on its own, in a fresh interpreter, as a reader would paste it."""
    _run(_python_blocks((ROOT / 'README.md').read_text(encoding='utf-8'))[index], tmp_path)


def test_the_docs_using_it_block_runs(tmp_path: Path):
    source = (ROOT / 'labml_nn' / 'transformers' / 'feedback' / '__init__.py').read_text(encoding='utf-8')
    blocks = _python_blocks(source.split('## Using it', 1)[1])
    assert blocks
    _run(blocks[0], tmp_path)


def test_paths_in_setup_py_exist():
    """setup.py's comments point at files that are there."""
    for path in re.findall(r'\b((?:labml_nn|tests|docs)/[\w/]+\.py)', (ROOT / 'setup.py').read_text()):
        assert (ROOT / path).exists(), path
