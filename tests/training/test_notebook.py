"""
The Colab notebook: its `.ipynb` is the jupytext `py:percent` source, committed without outputs, the README's
"Open in Colab" badge points at it, and it runs top to bottom headless with `NOTEBOOK_QUICK=1`.
"""

import os
import re
import time
from pathlib import Path

import pytest
from support import REPO, TEXT

from labml_nn.transformers.feedback.build import MODELS

nbformat = pytest.importorskip('nbformat')
jupytext = pytest.importorskip('jupytext')

SOURCE = REPO / 'notebooks' / 'feedback_transformer.py'
NOTEBOOK = REPO / 'notebooks' / 'feedback_transformer.ipynb'


def cells(nb):
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_notebook_matches_its_source():
    """`jupytext --update --to ipynb notebooks/feedback_transformer.py` gives the committed notebook's cells."""
    expected = jupytext.reads(SOURCE.read_text(encoding='utf-8'), fmt='py:percent')
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert cells(committed) == cells(expected), (
        f'{NOTEBOOK.name} is out of sync with {SOURCE.name}: '
        f'run `jupytext --update --to ipynb {SOURCE.relative_to(REPO)}`')
    assert committed.metadata.get('kernelspec', {}).get('name') == 'python3'


def test_notebook_is_committed_without_outputs():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(committed.cells):
        if cell.cell_type == 'code':
            assert cell.outputs == [] and cell.execution_count is None, (
                f'cell {i} of {NOTEBOOK.name} has outputs; regenerate it with jupytext')


def repository_url() -> str:
    """The notebook's `REPOSITORY_URL` (a literal: on Colab it is what installs the library)."""
    match = re.search(r"^REPOSITORY_URL = '(https://github\.com/[^']+)'$", SOURCE.read_text(), re.MULTILINE)
    assert match, 'the notebook names its repository in REPOSITORY_URL'
    return match.group(1)


def test_repository_url_is_the_projects():
    """The notebook's URL is the one the project declares: setup.py's `url=`, else the docs' `repository_url`."""
    declared = []
    setup = re.search(r'^\s*url\s*=\s*["\']([^"\']+)["\']', (REPO / 'setup.py').read_text(), re.MULTILINE)
    if setup:
        declared.append(setup.group(1))
    docs_config = REPO / 'docs' / '_generator' / 'config.yaml'
    if docs_config.is_file():
        docs = re.search(r'^repository_url:\s*(\S+)', docs_config.read_text(), re.MULTILINE)
        declared += [docs.group(1)] if docs else []
    if not declared:
        pytest.skip('the project declares no repository URL yet (setup.py url=)')
    assert repository_url() == declared[0], (repository_url(), declared)


def test_colab_badge_points_at_the_notebook():
    """Every "Open in Colab" link in the README (or its notebook section) opens this notebook of this repository."""
    github = repository_url().removeprefix('https://github.com/')
    expected = f'https://colab.research.google.com/github/{github}/blob/main/{NOTEBOOK.relative_to(REPO).as_posix()}'
    readmes = [p for p in (REPO / 'README.md', REPO / 'README.nb.md') if p.is_file()]
    links = [link for p in readmes
             for link in re.findall(r'https://colab\.research\.google\.com/github/[^)\s"]+', p.read_text())]
    assert links, 'the README has an "Open in Colab" badge'
    assert all(link == expected for link in links), (links, expected)


def test_notebook_runs_quick(tmp_path, monkeypatch):
    """Execute every cell in a fresh kernel, as CI does; any error fails. The figures are saved as PNG."""
    nbclient = pytest.importorskip('nbclient')
    if not TEXT.is_file():
        pytest.skip(f'Tiny Shakespeare not found at {TEXT}; set TINY_SHAKESPEARE_PATH')
    figures = Path(os.environ.get('NOTEBOOK_FIGURES') or tmp_path / 'figures')
    # The kernel inherits this environment: the quick run, the local text, the library from this checkout
    monkeypatch.setenv('NOTEBOOK_QUICK', '1')
    monkeypatch.setenv('TINY_SHAKESPEARE_PATH', str(TEXT))
    monkeypatch.setenv('NOTEBOOK_FIGURES', str(figures))
    # No `_` (which shells set): the notebook must cope with a kernel that labml would take for PyCharm's
    monkeypatch.delenv('_', raising=False)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    # labml writes `logs/` and `data/` under the working directory: a temporary one, not the repository
    work = tmp_path / 'work'
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                                     resources={'metadata': {'path': str(work)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    # `NOTEBOOK_QUICK=1` is meant to take under 2 minutes on 2 cores; timed here for the log, not asserted
    print(f'notebook executed in {seconds:.1f} s')

    outputs = {i: ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')
               for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'}
    everything = '\n'.join(outputs.values())
    # Every model trained, was sampled from, and the plots were drawn
    # Every model trained, and was sampled from: the prompt and 200 characters under a `--- <model> ... ---` line
    trained = re.findall(r'^(\S+) +150 steps +valid loss [0-9.]+ ', everything, re.MULTILINE)
    assert list(MODELS) == trained, everything[-3000:]
    samples = re.split(r'^--- (\S+) \([0-9,]+ characters/s\) ---\n', outputs[max(outputs)], flags=re.MULTILINE)
    assert samples[1::2] == list(MODELS), samples
    for text in samples[2::2]:
        assert text.startswith('It is') and len(text) >= len('It is') + 200, text
    for name in ('losses.png', 'memory_weights.png'):
        assert (figures / name).stat().st_size > 10_000, name
    images = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
              if 'image/png' in o.get('data', {})]
    assert len(images) == 2, 'the loss and memory-weight figures are shown'
    # labml's run folders went to the notebook's working directory
    assert sorted(p.name for p in (work / 'logs').iterdir()) == sorted(MODELS)
