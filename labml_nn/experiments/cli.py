"""
---
title: Running an experiment from the command line
summary: key=value overrides of labml configs, checked before anything starts; resume, labml's folders, torchrun.
---

# Command line

```
python -m labml_nn.transformers.feedback.experiment model=feedback_transformer_kv d_model=128 seq_len=64
```

Every argument is `key=value`, with the same keys as the labml configs (dotted keys reach sub-configs, e.g.
`optimizer.learning_rate=1.0`). Values are converted to the type of the config and checked, and an unknown
key, an unknown option or a value out of range stops the program with a message naming it, before a run folder
is made or data is downloaded. `--help` lists the keys.

## Where things go

labml keeps runs in `<project>/logs/<experiment>/<run uuid>/` and data in `<project>/data/`. The project is the
nearest folder, from the working directory up, holding a `.labml.yaml` (whose settings, such as `app_url`, are
used), else the working directory itself. Nothing is sent anywhere unless `app_url` points at a labml app.

## Resuming

`resume=<run uuid | run folder | checkpoint file>` loads the checkpoint, takes the configuration it was
trained with, applies the command line's `key=value` on top, and continues in a new run. Before the run starts,
a probe of the configuration (on the CPU, on the main rank) builds the text, its batches and, when resuming, the
model and the optimizer, and loads the checkpoint into them: a checkpoint of another model, of another size or
on another text stops here.

## Every failure ends in one line

| exit status | when | `error: ...` says |
|---|---|---|
| 0 | training ended | |
| 2 | a bad configuration, found before the run starts | the key and what it must be |
| 3 | training diverged (`max_nonfinite_steps`) | the steps, the last good checkpoint |
| 4 | another failure after the run started (a full disk, a crash) | the cause, the last intact checkpoint, `resume=` |
| 130, 143 | SIGINT, SIGTERM: stopped after writing a checkpoint | (where it is and how to resume) |

A failure after the run started prints no traceback: it goes to `error.log` in the run's folder, and the one line
says where. A checkpoint is written atomically ([checkpoint.py](checkpoint.html)), so a save that fails partway
leaves the previous checkpoint intact.

## One parser

`key=value` arguments are parsed in one place, `parse_key_values`, for the experiments (whose keys and types are
the configs') and for the library's other commands ([sampling](../transformers/feedback/generate.html)).
"""

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

from labml import experiment, lab, monit

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.configs import TrainingConfigs
from labml_nn.experiments.distributed import (
    DistributedContext,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from labml_nn.experiments.labml_adapter import (
    app_configured,
    check_option,
    checkpoint_folder,
    computed,
    config_default,
    prepare_labml,
    public_options,
    set_values,
    yaml_load,
)
from labml_nn.experiments.run_control import DIVERGED_EXIT_CODE, TrainingDiverged, exit_status

# Exit status of a run that failed after it started (other than by divergence or a signal)
FAILED_EXIT_CODE = 4

_TRUE = {'true', '1', 'yes', 'on'}
_FALSE = {'false', '0', 'no', 'off'}


def _annotations(cls: type) -> Dict[str, Any]:
    """Config annotations of `cls` and its bases (nearest wins)."""
    out: Dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        out.update({k: v for k, v in getattr(base, '__annotations__', {}).items() if not k.startswith('_')})
    return out


def convert(key: str, raw: str, kind: Any, options: Optional[List[str]] = None) -> Any:
    """Convert the command-line string `raw` for `key` of type `kind`, or raise a `ValueError` naming `key`."""
    if options:
        check_option(key, raw, options)
        return raw
    if kind is bool:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"{key} must be true or false, got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{key} must be {'an int' if kind is int else 'a number'}, "
                             f"got {raw!r}") from None
    if kind is str:
        return raw
    raise ValueError(f"{key} cannot be set from the command line (it is computed)")


def parse_key_values(argv: List[str], convert_one: Callable[[str, str], Any], keys: str = '--help') -> Dict[str, Any]:
    """
    `key=value` arguments to a dictionary: `convert_one(key, raw)` types each value, or raises a `ValueError` for an
    unknown key; `keys` says where the keys are listed, for the error of an argument without `=`.
    """
    values: Dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition('=')
        if not sep or not key:
            raise ValueError(f"arguments are key=value (e.g. seq_len=64), got {arg!r}; keys: {keys}")
        values[key] = convert_one(key, raw)
    return values


def parse_overrides(conf_class: Type[TrainingConfigs], argv: List[str]) -> Dict[str, Any]:
    """The experiment's `key=value` arguments to a dictionary of typed config values."""
    sub_configs = conf_class._sub_configs
    known = _annotations(conf_class)
    probe = conf_class()

    def convert_one(key: str, raw: str) -> Any:
        prefix, _, sub_key = key.partition('.')
        if sub_key and prefix in sub_configs:
            sub_class = sub_configs[prefix]
            sub_known = _annotations(sub_class)
            if sub_key not in sub_known:
                raise ValueError(f"Unknown config key {key!r}; "
                                 f"{prefix}.* keys are {', '.join(sorted(sub_known))}")
            return convert(key, raw, sub_known[sub_key], public_options(sub_class(), sub_key))
        if key in known:
            # Only options a user can choose: a key whose only option computes it (`_name`) is not settable
            return convert(key, raw, known[key], public_options(probe, key))
        raise ValueError(f"Unknown config key {key!r}; see --help for the keys")

    return parse_key_values(argv, convert_one)


def usage(conf_class: Type[TrainingConfigs]) -> str:
    """The `--help` text: every settable key with its type, and its default or options."""
    module = conf_class.__module__
    lines = [f"Usage: python -m {module} [key=value ...]", "", "Config keys:"]
    for prefix, cls in (('', conf_class), *((f'{k}.', c) for k, c in conf_class._sub_configs.items())):
        conf = cls()
        defaults = conf_class._defaults if not prefix else {
            k[len(prefix):]: v for k, v in conf_class._defaults.items() if k.startswith(prefix)}
        for key, kind in sorted(_annotations(cls).items()):
            options = public_options(conf, key)
            default = defaults.get(key, config_default(cls, key))
            if options:
                lines.append(f"  {prefix}{key}: one of {', '.join(options)} "
                             f"(default {default or options[0]})")
            elif kind in (int, float, str, bool):
                lines.append(f"  {prefix}{key}: {kind.__name__} (default {default!r})")
    return '\n'.join(lines)


def configure_lab() -> None:
    """Use the nearest `.labml.yaml` from the working directory up, else the working directory, as the project."""
    cwd = Path.cwd().resolve()
    for folder in [cwd, *cwd.parents]:
        config_file = folder / '.labml.yaml'
        if config_file.is_file():
            settings = yaml_load(config_file.read_text()) or {}
            settings.setdefault('path', str(folder))
            settings['config_file_path'] = folder
            lab.configure(settings)
            return
    lab.configure({'path': str(cwd)})


def _prepare(conf_class: Type[TrainingConfigs], overrides: Dict[str, Any],
             ctx: DistributedContext) -> Dict[str, Any]:
    """
    On the main rank, before a run exists: merge a resumed run's configuration, check the values, the data and the
    checkpoint with a probe of the configs on the CPU.
    """
    payload = None
    if overrides.get('resume'):
        path = ckpt.find_checkpoint(overrides['resume'], lab.get_experiments_path())
        payload = ckpt.load_checkpoint(path)
        overrides = {**payload['config'], **overrides}
    probe = conf_class()
    probe._dist = ctx
    probe._resume_payload = payload
    set_values(probe, {**overrides, 'use_cuda': False})
    probe.validate()
    # The data (and, when resuming, a model and an optimizer to load the checkpoint into), built quietly
    with monit.section('Check', is_silent=True, is_children_silent=True):
        probe.check_data()
        if payload is not None:
            probe.check_resume(payload)
    uuid = os.environ.get('RUN_UUID') or experiment.generate_uuid()
    return {'overrides': overrides, 'payload': payload, 'uuid': uuid, 'name': probe.experiment_name()}


def _setup(conf_class: Type[TrainingConfigs], argv: List[str],
           ctx: DistributedContext) -> Dict[str, Any]:
    """Parse and check on the main rank, and hand every rank the result (or the error)."""
    overrides = parse_overrides(conf_class, argv)
    configure_lab()
    setup: Dict[str, Any] = {}
    if ctx.is_main:
        try:
            setup = _prepare(conf_class, overrides, ctx)
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
            setup = {'error': str(e)}
    setup = broadcast_object(ctx, setup)
    if 'error' in setup:
        raise ValueError(setup['error'])
    return setup


class RunFailed(Exception):
    """A run that had started failed; the message is the one line to print."""


def run_experiment(conf_class: Type[TrainingConfigs], argv: Optional[List[str]] = None) -> None:
    """Parse `argv`, start a labml experiment (one per rank under torchrun) and train; exits non-zero on failure."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        print(usage(conf_class))
        return
    prepare_labml()
    ctx = init_distributed()
    status = 0
    try:
        _train(conf_class, ctx, _setup(conf_class, argv, ctx))
        # Every rank finishes (rank 0 may still be writing the checkpoint) before the group is torn down
        barrier(ctx)
    except KeyboardInterrupt as e:
        # The trainer names the signal after every rank stopped at the same step with a checkpoint
        status = exit_status(e.args[0] if e.args else 2)
        if e.args:
            barrier(ctx)
    except TrainingDiverged as e:
        status = _error(ctx, e, DIVERGED_EXIT_CODE)
    except RunFailed as e:
        status = _error(ctx, e, FAILED_EXIT_CODE)
    except (ValueError, TypeError, FileNotFoundError) as e:
        status = _error(ctx, e, 2)
    finally:
        shutdown_distributed(ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    if ctx.is_distributed and not ctx.is_main:
        # A helper rank has nothing left to save; leave without the interpreter's teardown, where gloo's threads
        # can abort the process ("terminate called without an active exception") after a successful run
        os._exit(status)
    if status:
        sys.exit(status)


def _error(ctx: DistributedContext, error: Exception, status: int) -> int:
    """Print `error: ...` (main rank) and return the exit status."""
    if ctx.is_main:
        print(f"error: {error}", file=sys.stderr)
    return status


def _train(conf_class: Type[TrainingConfigs], ctx: DistributedContext,
           setup: Dict[str, Any]) -> None:
    conf = conf_class()
    conf._dist = ctx
    conf._resume_payload = setup['payload']
    writers = {'screen', 'file'} if ctx.is_main else set()
    if ctx.is_main and app_configured():
        writers.add('app')
    experiment.create(uuid=setup['uuid'], name=setup['name'], writers=writers,
                      distributed_rank=ctx.rank,
                      distributed_world_size=ctx.world_size if ctx.is_distributed else 0,
                      disable_screen=not ctx.is_main)
    experiment.configs(conf, dict(setup['overrides']))
    with experiment.start():
        try:
            conf.run()
        except (KeyboardInterrupt, TrainingDiverged):
            raise
        except Exception as e:
            # The run has started: one line for the user, the traceback in the run's folder
            raise RunFailed(_failure_line(conf, e, log_traceback(e))) from None


def root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain (`raise ... from` or raised while handling another)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def log_traceback(error: BaseException) -> Optional[Path]:
    """Write `error`'s traceback to `error.log` in the run's folder; the file, or `None` if it could not be written."""
    folder = checkpoint_folder()
    if folder is None:
        return None
    path = folder.parent / 'error.log'
    try:
        path.write_text(''.join(traceback.format_exception(error)))
    except OSError:
        return None
    return path


def _failure_line(conf: TrainingConfigs, error: BaseException, log: Optional[Path]) -> str:
    """The one line that says why a started run failed, what is intact, and how to go on."""
    cause = root_cause(error)
    trainer = computed(conf, 'trainer')
    where = f"the traceback is in {log}" if log is not None else "no traceback could be written"
    line = f"{type(cause).__name__}: {cause} ({where})."
    if trainer is None:
        return f"the run failed before its first step: {line}"
    line = f"the run failed at step {trainer.progress['step']:,}: {line} {trainer.checkpoint.describe()}"
    if trainer.checkpoint.saved_step is None:
        return line
    return f"{line} Resume with: {trainer.resume_command()}"
