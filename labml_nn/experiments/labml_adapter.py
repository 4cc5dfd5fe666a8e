"""
---
title: The one place that touches labml's internals
summary: Every private labml API the experiments rely on, behind small functions, checked against the installed
  labml when it is imported.
---

# Adapter to labml's internals

labml 0.5.3's public API (`experiment`, `lab`, `tracker`, `monit`, `logger`, `configs.option`) runs an experiment,
but the command line, the checkpoints and the notebook need a few things labml keeps private. They all go through
this module, so a labml release that changes one of them fails here, at import, with a message that says what
changed, and not somewhere deep in a training run:

* `BaseConfigs._get_computed(key)` is the value computed for a key so far (`None` before), which the command line
  reads after a failure (how far the run got) without computing anything;
* `BaseConfigs._to_json()` lists every config key with its **options** (`--help`, the option checks and the default
  model name come from it);
* `BaseConfigs._set_values(values)` is what `experiment.configs(conf, values)` calls; the training configs
  ([configs.py](configs.html)) wrap it to reject an unknown option value with a clear message and to record the
  values that a checkpoint stores;
* attributes whose names start with `_` (`_overrides`, `_dist`, ...) are plain attributes that labml's configs
  leave alone, and a configs class attribute holds a `ConfigItem` whose `has_value` / `value` is its default;
* `BaseConfigs.set_default(item, value)` gives **one configs object** a default of its own. An experiment sets its
  defaults this way (`_defaults`), never by declaring a base class's key again with another value: while a configs
  object is made, labml 0.5.3 writes a subclass's declared defaults into the `ConfigItem`s of its base classes, so
  a second experiment in the same process would start from the first one's values;
* `labml.internal.experiment.experiment_singleton().run.checkpoint_path` is the run's checkpoint folder (and
  `has_experiment()` whether there is a run);
* `labml.internal.lab.lab_singleton().app_configs` says whether a labml app is configured;
* `labml.internal.util.yaml_load` reads `.labml.yaml` the way labml does.

## Runs started at the same time

Every run registers its project folder in `~/.labml/projects/` (one small file per project), and labml's
`Computer.get_projects()` reads that folder and deletes duplicate entries. Two runs that start at the same moment
(two experiments side by side, the state-tracking presets) can both find the same duplicate: the second one's
`unlink` (or `open`, for a file the first just deleted) raised `FileNotFoundError`, and that run died before its
first step. `install_concurrent_projects()` replaces that method with one that reads and deletes the same way but
takes a file that another process removed first as removed.

## IPython 9

labml's notebook logger does `from IPython.core.display import display, HTML` when it first logs inside a Jupyter
kernel. IPython 9 removed `display` from `IPython.core.display` (it lives in `IPython.display`), so with a current
IPython any labml logging in a notebook raised an `ImportError`. `install_ipython_shim()` gives
`IPython.core.display` the two names from `IPython.display` before labml creates its logger. It only acts in a
process that has already loaded IPython (a kernel always has), so a command-line run does not pay for importing
IPython.

## Nothing happens at import

Importing this module (or anything in `labml_nn`) changes nothing in the user's process. The check of the installed
labml and both patches run in `prepare_labml()`, once per process, when an experiment is set up: the training
configs call it when they are made, and the command line before it creates a run.
"""

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

import labml
from labml.configs import BaseConfigs

# The labml versions this module was checked against (`setup.py` requires the same)
TESTED_LABML = '>=0.5.3,<0.6'


def install_ipython_shim() -> bool:
    """
    Make `from IPython.core.display import display, HTML` (labml's notebook logger) work on IPython 9, where
    those names moved to `IPython.display`. Returns whether anything was added.
    """
    if 'IPython' not in sys.modules:
        return False
    try:
        import IPython.core.display as core_display
        import IPython.display as public_display
    except ImportError:
        return False
    added = False
    for name in ('display', 'HTML'):
        # `vars()`: IPython 8 serves `display` through a deprecated module `__getattr__`; give it the real one
        if name not in vars(core_display) and hasattr(public_display, name):
            setattr(core_display, name, getattr(public_display, name))
            added = True
    return added


# ## Configs

def config_options(conf: BaseConfigs) -> Dict[str, List[str]]:
    """The option names of every config key of `conf` (an empty list for a plain value)."""
    return {key: list(info['options']) for key, info in conf._to_json().items()}


def public_options(conf: BaseConfigs, key: str) -> List[str]:
    """The options of `key` a user can choose (`_name` options compute a value; they are not choices)."""
    return [o for o in config_options(conf).get(key, []) if not o.startswith('_')]


def config_default(cls: type, key: str) -> Any:
    """The default that configs class `cls` declares for `key`, or `None`."""
    item = getattr(cls, key)
    return item.value if item.has_value else None


def check_option(key: str, value: Any, options: List[str]) -> None:
    """A `ValueError` naming `key` and the choices when the string `value` is not one of `options`."""
    if options and isinstance(value, str) and value not in options:
        raise ValueError(f"{key}={value!r} is not an option; choose one of {', '.join(options)}")


def set_values(conf: BaseConfigs, values: Dict[str, Any]) -> None:
    """What `experiment.configs(conf, values)` does to `conf`, without an experiment."""
    conf._set_values(values)


def computed(conf: BaseConfigs, key: str) -> Any:
    """The value labml computed for `key` of `conf` so far, or `None` (without computing it)."""
    return conf._get_computed(key)


def set_default(conf: BaseConfigs, key: str, value: Any) -> None:
    """Give `conf` (this one object) the default `value` for `key`; a value set later still takes precedence."""
    conf.set_default(getattr(type(conf), key), value)


def _get_projects(self: Any) -> Set[str]:
    """labml's `Computer.get_projects()`, safe against another process deleting the same files at once."""
    projects: Set[str] = set()
    to_remove = []
    for entry in self.projects_folder.iterdir():
        try:
            project_path = entry.read_text()
        except FileNotFoundError:
            # Another process removed this duplicate a moment ago
            continue
        # A duplicate entry, or one for a project folder that is gone
        if project_path in projects or not Path(project_path).exists():
            to_remove.append(entry)
        else:
            projects.add(project_path)
    for entry in to_remove:
        entry.unlink(missing_ok=True)
    return projects


# labml's own `Computer.get_projects`, kept for the tests
labml_get_projects: Optional[Callable[[Any], Set[str]]] = None


def install_concurrent_projects() -> None:
    """Make labml's project registry safe for runs that start at the same time (see above)."""
    global labml_get_projects
    from labml.internal.computer.configs import Computer
    if Computer.get_projects is not _get_projects:
        labml_get_projects = Computer.get_projects
        Computer.get_projects = _get_projects


# ## Runs and the lab

def checkpoint_folder() -> Optional[Path]:
    """The checkpoint folder of the labml experiment (`<run folder>/checkpoints`); `None` without one."""
    from labml.internal.experiment import experiment_singleton, has_experiment
    return Path(experiment_singleton().run.checkpoint_path) if has_experiment() else None


def app_configured() -> bool:
    """Whether `.labml.yaml` (or `labml_app_url`) points labml at an app to send runs to."""
    from labml.internal.lab import lab_singleton
    return lab_singleton().app_configs is not None


def yaml_load(text: str) -> Any:
    """Parse `.labml.yaml` as labml does."""
    from labml.internal import util
    return util.yaml_load(text)


# ## Checking the installed labml

def check_labml() -> List[str]:
    """
    Try every private API above on the installed labml; returns what is missing or behaves differently (an empty
    list when all is as expected).
    """
    problems: List[str] = []

    class Probe(BaseConfigs):
        size: int = 3
        kind: str

    @labml.configs.option(Probe.kind, 'a')
    def _kind_a(c: Probe) -> str:
        return 'a'

    try:
        probe = Probe()
        probe._private = 1
        if vars(probe).get('_private') != 1:
            problems.append('a `_name` attribute of a BaseConfigs is no longer a plain attribute')
        if config_options(probe).get('kind') != ['a']:
            problems.append('BaseConfigs._to_json() no longer lists the options of a key')
        if config_default(Probe, 'size') != 3:
            problems.append('a BaseConfigs class attribute is no longer a ConfigItem with has_value / value')
        own = Probe()
        set_default(own, 'size', 4)
        if own.size != 4 or config_default(Probe, 'size') != 3 or Probe().size != 3:
            problems.append('BaseConfigs.set_default() no longer gives one configs object a default of its own')
        from labml import monit
        with monit.section('Check labml', is_silent=True, is_children_silent=True):
            before, value = computed(probe, 'kind'), probe.kind
        if before is not None or value != 'a' or computed(probe, 'kind') != 'a':
            problems.append('BaseConfigs._get_computed() no longer returns what was computed (and only that)')
        set_values(probe, {'size': 5})
        if probe.size != 5:
            problems.append('BaseConfigs._set_values() no longer sets the values experiment.configs() passes')
    except Exception as e:
        problems.append(f'labml configs: {type(e).__name__}: {e}')
    for module, name in (('labml.internal.experiment', 'experiment_singleton'),
                         ('labml.internal.experiment', 'has_experiment'),
                         ('labml.internal.lab', 'lab_singleton'), ('labml.internal.util', 'yaml_load')):
        try:
            getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            problems.append(f'{module}.{name} is gone')
    try:
        from labml.internal.computer.configs import Computer
        if not callable(getattr(Computer, 'get_projects', None)) or not _sets_attribute(Computer, 'projects_folder'):
            problems.append('labml.internal.computer.configs.Computer no longer has get_projects / projects_folder')
    except ImportError as e:
        problems.append(str(e))
    try:
        from labml.internal.experiment.experiment_run import Run
        from labml.internal.lab import Lab
        for cls, name in ((Run, 'checkpoint_path'), (Lab, 'app_configs')):
            if not _sets_attribute(cls, name):
                problems.append(f'{cls.__module__}.{cls.__name__} no longer has {name}')
    except ImportError as e:
        problems.append(str(e))
    return problems


def _sets_attribute(cls: type, name: str) -> bool:
    """Whether a method of `cls` (or of a base) sets or reads `self.<name>`, or a class declares it."""
    for base in cls.__mro__:
        codes = [f.__code__ for f in vars(base).values() if hasattr(f, '__code__')]
        if name in vars(base).get('__annotations__', {}) or any(name in c.co_names for c in codes):
            return True
    return False


def check_installed_labml() -> None:
    problems = check_labml()
    if problems:
        raise RuntimeError(f"labml {labml.__version__} changed private APIs that labml_nn uses "
                           f"(labml_nn/experiments/labml_adapter.py): {'; '.join(problems)}. "
                           f"labml_nn is tested with labml{TESTED_LABML}: pip install 'labml{TESTED_LABML}'")


_prepared = False


def prepare_labml() -> None:
    """
    Before an experiment is set up: check the installed labml's private APIs and make its project registry safe
    for runs that start together (once per process), and make its notebook logger work with IPython 9.
    """
    global _prepared
    if not _prepared:
        check_installed_labml()
        install_concurrent_projects()
        _prepared = True
    # At every call: a notebook may load IPython after the first experiment was set up
    install_ipython_shim()
