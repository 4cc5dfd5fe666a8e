"""
labml compatibility: the private labml APIs the experiments use (all in `labml_nn/experiments/labml_adapter.py`)
are checked, and a labml that changed them fails at import with a message saying what changed; labml's notebook
logger works with IPython 9; labml_nn's own experiment configuration runs unchanged; an unknown option value is a
clear error from Python as from the command line.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import labml
import pytest
import torch
from labml import experiment
from labml.internal.configs.base import Configs as LabmlConfigs
from support import REPO, TEXT

from labml_nn.experiments import labml_adapter
from labml_nn.transformers.feedback.experiment import Configs


def test_installed_labml_has_what_the_adapter_uses():
    assert labml_adapter.check_labml() == []


def test_setup_bounds_labml_to_the_tested_versions():
    from packaging.specifiers import SpecifierSet
    setup = (REPO / 'setup.py').read_text()
    assert f'"labml{labml_adapter.TESTED_LABML}"' in setup
    assert labml.__version__ in SpecifierSet(labml_adapter.TESTED_LABML)


def _drop(module: str, name: str):
    return lambda monkeypatch: monkeypatch.delattr(f'{module}.{name}')


@pytest.mark.parametrize('change, problem', [
    (lambda m: m.delattr(LabmlConfigs, '_to_json'), "labml configs: AttributeError"),
    (lambda m: m.setattr(LabmlConfigs, '_to_json', lambda self: {}),
     'BaseConfigs._to_json() no longer lists the options of a key'),
    (lambda m: m.setattr(LabmlConfigs, '_set_values', lambda self, values: None),
     'BaseConfigs._set_values() no longer sets the values experiment.configs() passes'),
    (_drop('labml.internal.experiment', 'experiment_singleton'),
     'labml.internal.experiment.experiment_singleton is gone'),
    (_drop('labml.internal.experiment', 'has_experiment'), 'labml.internal.experiment.has_experiment is gone'),
    (_drop('labml.internal.lab', 'lab_singleton'), 'labml.internal.lab.lab_singleton is gone'),
    (_drop('labml.internal.util', 'yaml_load'), 'labml.internal.util.yaml_load is gone'),
])
def test_a_changed_labml_fails_loudly(monkeypatch, change, problem):
    """Simulate a labml release that changed one private API: the import-time check names it and the fix."""
    change(monkeypatch)
    assert any(p.startswith(problem) for p in labml_adapter.check_labml()), labml_adapter.check_labml()
    with pytest.raises(RuntimeError) as e:
        labml_adapter.check_installed_labml()
    message = str(e.value)
    assert message.startswith(f'labml {labml.__version__} changed private APIs that labml_nn uses '
                              f'(labml_nn/experiments/labml_adapter.py): ')
    assert problem in message and "pip install 'labml>=0.5.3,<0.6'" in message


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, 'TINY_SHAKESPEARE_PATH': str(TEXT),
                'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]), **env}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_labml_notebook_logger_imports_with_current_ipython(tmp_path):
    """
    labml's notebook logger imports `display` and `HTML` from `IPython.core.display`, which IPython 9 removed: they
    are put back when an experiment is set up (making its configs), not when the library is imported.
    """
    pytest.importorskip('IPython')
    result = _python('''
        import IPython
        import IPython.core.display as core
        missing = 'display' not in vars(core)
        import labml_nn.experiments.cli, labml_nn.transformers.feedback.experiment
        assert ('display' not in vars(core)) == missing, 'importing the library must change nothing'
        from labml_nn.transformers.feedback.experiment import Configs
        Configs()
        from labml.internal.logger.destinations.ipynb import IpynbDestination
        import IPython.display
        assert core.display is IPython.display.display and core.HTML is IPython.display.HTML
        print(IPython.__version__, missing)
    ''', tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    version, missing = result.stdout.split()[-2:]
    # With IPython 9 the names really are missing until the adapter adds them
    assert missing == str(int(version.split('.')[0]) >= 9)


# labml_nn's `labml_nn/transformers/feedback/experiment.py` `main()`, verbatim (without the removed
# `experiment.add_pytorch_models`)
LABML_NN_CONFIG = {'tokenizer': 'character',
                   'text': 'tiny_shakespeare',
                   'optimizer.learning_rate': 1.0,
                   'optimizer.optimizer': 'Noam',
                   'prompt': 'It is',
                   'prompt_separator': '',
                   'model': 'feedback_transformer_kv',
                   'train_loader': 'shuffled_train_loader',
                   'valid_loader': 'shuffled_valid_loader',
                   'seq_len': 128,
                   'epochs': 128,
                   'batch_size': 64,
                   'inner_iterations': 25}


@pytest.mark.skipif(not TEXT.is_file(), reason=f'Tiny Shakespeare not found at {TEXT}')
def test_labml_nn_experiment_configuration_runs_unchanged(tmp_path):
    """
    labml_nn's configuration dictionary builds the data as given, and trains (scaled down to a tiny model and
    two steps by a second dictionary on top, as labml merges them); the checkpoint records the configuration.
    """
    result = _python(f'''
        import torch
        from labml import experiment
        from labml_nn.transformers.feedback.experiment import Configs
        from labml_nn.experiments.labml_adapter import set_values

        config = {LABML_NN_CONFIG!r}
        # The data, as labml_nn's sizes make it
        probe = Configs()
        set_values(probe, config)
        probe.validate()
        probe.check_data()
        print('batches', len(probe.train_loader), len(probe.valid_loader), probe.text.n_tokens)

        experiment.create(name='feedback_transformer')
        conf = Configs()
        experiment.configs(conf, {{**config, 'd_model': 16, 'heads': 2, 'd_ff': 32, 'n_layers': 1, 'seq_len': 16,
                                   'batch_size': 8, 'inner_iterations': 2, 'train_steps': 2, 'valid_batches': 1,
                                   'sample_tokens': 5, 'num_threads': 1, 'use_cuda': False}})
        with experiment.start():
            conf.run()
        print('uuid', experiment.get_uuid())
    ''', tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = re.sub(r'\x1b\[[0-9;]*m', '', result.stdout)
    # 1,003,854 training characters: 7,842 sequences of 128, 122 batches of 64; 111,540 validation ones: 13
    assert 'batches 122 13 65' in out, out[-2000:]
    uuid = re.search(r'^uuid (\w+)$', out, re.MULTILINE)[1]
    payload = torch.load(tmp_path / 'logs' / 'feedback_transformer' / uuid / 'checkpoints' / 'checkpoint.pt',
                         weights_only=True)
    assert payload['progress']['step'] == 2
    # What `experiment.configs` was given is what `resume=` will restore
    expected = {**LABML_NN_CONFIG, 'seq_len': 16, 'batch_size': 8, 'inner_iterations': 2, 'train_steps': 2}
    assert {k: payload['config'][k] for k in expected} == expected


@pytest.mark.parametrize('values, message', [
    ({'text': 'tiny_shakespear'}, "text='tiny_shakespear' is not an option; choose one of tiny_shakespeare"),
    ({'train_loader': 'sequential_train_loader'},
     "train_loader='sequential_train_loader' is not an option; choose one of shuffled_train_loader"),
    ({'model': 'lstm'},
     "model='lstm' is not an option; choose one of feedback_transformer, feedback_transformer_kv, transformer"),
    ({'optimizer.optimizer': 'SGD'},
     "optimizer.optimizer='SGD' is not an option; choose one of Adam, Noam, AdamWarmup, AdamCosine"),
])
def test_an_unknown_option_from_python_is_a_clear_error(values, message):
    experiment.evaluate()
    with pytest.raises(ValueError) as e:
        experiment.configs(Configs(), values)
    assert str(e.value) == message


def test_values_that_are_not_option_names_still_work():
    """A value given as an object (not a name), and keys whose options compute a value, are labml's as before."""
    conf = Configs()
    labml_adapter.set_values(conf, {'tokenizer': list, 'device': torch.device('cpu'), 'n_tokens': 7})
    assert conf.tokenizer is list and conf.device == torch.device('cpu') and conf.n_tokens == 7


class _RacingComputer:
    """A labml `Computer` whose projects folder loses an entry to another process while it is being read."""

    def __init__(self, folder: Path, lost: str):
        self.folder, self.lost = folder, lost
        self.projects_folder = self

    def iterdir(self):
        for entry in sorted(self.folder.iterdir()):
            # The other process removes this duplicate just before this one opens it
            if entry.name == self.lost:
                entry.unlink()
            yield entry


@pytest.mark.parametrize('lost', ['a.txt', 'b.txt'])
def test_runs_that_start_together_share_the_project_registry(tmp_path, lost):
    from labml.internal.computer.configs import Computer
    labml_adapter.prepare_labml()
    assert Computer.get_projects is labml_adapter._get_projects, 'installed when an experiment is set up'
    folder = tmp_path / 'projects'
    folder.mkdir()
    project = tmp_path / 'project'
    project.mkdir()

    def registry():
        # Two entries for the same project (two runs registered it at once), and one for a folder that is gone
        for name, path in (('a.txt', project), ('b.txt', project), ('c.txt', tmp_path / 'gone')):
            (folder / name).write_text(str(path))
        return _RacingComputer(folder, lost)

    # labml's own method fails this way
    with pytest.raises(FileNotFoundError):
        labml_adapter.labml_get_projects(registry())
    # The adapter's reads the project once and removes the entry of the folder that is gone
    assert labml_adapter._get_projects(registry()) == {str(project)}
    assert sorted(p.name for p in folder.iterdir()) == sorted({'a.txt', 'b.txt'} - {lost})


def test_importing_the_library_patches_nothing(tmp_path):
    """Every module of labml_nn imported: labml's project registry and IPython are as they were."""
    result = _python('''
        import pkgutil, importlib, sys
        import IPython.core.display as core
        from labml.internal.computer.configs import Computer
        before = (Computer.get_projects, dict(vars(core)))
        import labml_nn
        for module in pkgutil.walk_packages(labml_nn.__path__, 'labml_nn.'):
            importlib.import_module(module.name)
        assert (Computer.get_projects, dict(vars(core))) == before
        print('imported', len(sys.modules))
    ''', tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
