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

* `BaseConfigs._to_json()` lists every config key with its **options** (`--help`, the option checks and the default
  model name come from it);
* `BaseConfigs._set_values(values)` is what `experiment.configs(conf, values)` calls; `CheckedConfigs` wraps it to
  reject an unknown option value with a clear message and to record the values that a checkpoint stores;
* attributes whose names start with `_` (`_overrides`, `_dist`, ...) are plain attributes that labml's configs
  leave alone, and a configs class attribute holds a `ConfigItem` whose `has_value` / `value` is its default;
* while a configs object is made, labml 0.5.3 writes a subclass's defaults into the `ConfigItem`s of its base
  classes; `base_defaults_kept()` puts them back, so that a task's configs class (the state-tracking task's) leaves
  the text experiment's defaults alone in the same process;
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
`IPython.core.display` the two names from `IPython.display` before labml creates its logger; importing
`labml_nn.experiments` installs it. It only acts in a process that has already loaded IPython (a kernel always
has), so a command-line run does not pay for importing IPython.
"""

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

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


class CheckedConfigs(BaseConfigs):
    """
    labml configs whose values, as `experiment.configs(conf, values)` sets them, are checked and recorded:

    * a string given for a key that has options must be one of them (`text='tiny_shakespear'` is a `ValueError`
      that lists the choices, instead of a string turning up where a dataset is expected);
    * every plain value (str, int, float, bool) lands in `self._overrides`, the configuration that checkpoints
      store and `resume=` restores.

    `_sub_configs` maps a key to the configs class of its dotted keys (`optimizer.learning_rate`), so those are
    checked at once too.
    """
    _sub_configs: Dict[str, type] = {}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._overrides: Dict[str, Any] = {}

    def _set_values(self, values: Dict[str, Any]) -> None:
        own = config_options(self)
        for key, value in values.items():
            prefix, _, sub_key = key.partition('.')
            if sub_key and prefix in self._sub_configs:
                check_option(key, value, public_options(self._sub_configs[prefix](), sub_key))
            elif key in own:
                check_option(key, value, [o for o in own[key] if not o.startswith('_')])
        super()._set_values(values)
        self._overrides.update({k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))})


def set_values(conf: BaseConfigs, values: Dict[str, Any]) -> None:
    """What `experiment.configs(conf, values)` does to `conf`, without an experiment."""
    conf._set_values(values)


@contextmanager
def base_defaults_kept(cls: type) -> Iterator[None]:
    """
    Make a configs object of `cls` inside this block and the config items of `cls`'s base classes keep their
    defaults. Options that `cls` registers again for a base's key replace the base's on purpose: labml's warning
    about that is silenced.
    """
    items = [(item, dict(vars(item))) for base in cls.__mro__[1:]
             for item in vars(base).values() if type(item).__name__ == 'ConfigItem']
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Overriding option')
            yield
    finally:
        for item, saved in items:
            vars(item).update(saved)


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

    class Probe(CheckedConfigs):
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
        class Sub(Probe):
            size: int = 4
        with base_defaults_kept(Sub):
            Sub()
        if config_default(Probe, 'size') != 3:
            problems.append("base_defaults_kept() no longer keeps a base class's defaults")
        set_values(probe, {'size': 5})
        if probe.size != 5 or probe._overrides != {'size': 5}:
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


def _check_on_import() -> None:
    problems = check_labml()
    if problems:
        raise RuntimeError(f"labml {labml.__version__} changed private APIs that labml_nn uses "
                           f"(labml_nn/experiments/labml_adapter.py): {'; '.join(problems)}. "
                           f"labml_nn is tested with labml{TESTED_LABML}: pip install 'labml{TESTED_LABML}'")


_check_on_import()
install_concurrent_projects()
install_ipython_shim()
