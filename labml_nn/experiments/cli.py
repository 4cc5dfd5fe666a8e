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

## Exit status

0 when training ends; 2 with one line `error: ...` for a bad configuration (or any `ValueError` that a check
missed); 3 when training diverged (`max_nonfinite_steps`); 130 / 143 when SIGINT / SIGTERM stopped it after
writing a checkpoint.
"""

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Type

from labml import experiment, lab, monit

from labml_nn.experiments import checkpoint as ckpt
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
    config_default,
    public_options,
    set_values,
    yaml_load,
)
from labml_nn.experiments.nlp_autoregression import NLPAutoRegressionConfigs
from labml_nn.experiments.run_control import DIVERGED_EXIT_CODE, TrainingDiverged, exit_status

_TRUE = {'true', '1', 'yes', 'on'}
_FALSE = {'false', '0', 'no', 'off'}


def _annotations(cls: type) -> Dict[str, Any]:
    """Config annotations of `cls` and its bases (nearest wins)."""
    out: Dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        out.update({k: v for k, v in getattr(base, '__annotations__', {}).items() if not k.startswith('_')})
    return out


def _convert(key: str, raw: str, kind: Any, options: List[str]) -> Any:
    """Convert the command-line string `raw` for config `key` of type `kind`, or raise a `ValueError`."""
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


def parse_overrides(conf_class: Type[NLPAutoRegressionConfigs], argv: List[str]) -> Dict[str, Any]:
    """`key=value` arguments to a dictionary of typed config values."""
    sub_configs = conf_class._sub_configs
    known = _annotations(conf_class)
    probe = conf_class()
    overrides: Dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition('=')
        if not sep or not key:
            raise ValueError(f"Arguments are key=value (e.g. seq_len=64), got {arg!r}")
        prefix, _, sub_key = key.partition('.')
        if sub_key and prefix in sub_configs:
            sub_class = sub_configs[prefix]
            sub_known = _annotations(sub_class)
            if sub_key not in sub_known:
                raise ValueError(f"Unknown config key {key!r}; "
                                 f"{prefix}.* keys are {', '.join(sorted(sub_known))}")
            overrides[key] = _convert(key, raw, sub_known[sub_key], public_options(sub_class(), sub_key))
        elif key in known:
            # Only options a user can choose: a key whose only option computes it (`_name`) is not settable
            overrides[key] = _convert(key, raw, known[key], public_options(probe, key))
        else:
            raise ValueError(f"Unknown config key {key!r}; see --help for the keys")
    return overrides


def usage(conf_class: Type[NLPAutoRegressionConfigs]) -> str:
    """The `--help` text: every settable key with its type, default or options."""
    lines = ["Usage: python -m labml_nn.transformers.feedback.experiment [key=value ...]", "", "Config keys:"]
    for prefix, cls in (('', conf_class), *((f'{k}.', c) for k, c in conf_class._sub_configs.items())):
        conf = cls()
        experiment_defaults = conf_class._optimizer_defaults if prefix == 'optimizer.' else {}
        for key, kind in sorted(_annotations(cls).items()):
            options = public_options(conf, key)
            default = experiment_defaults.get(key, config_default(cls, key))
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


def _prepare(conf_class: Type[NLPAutoRegressionConfigs], overrides: Dict[str, Any],
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


def _setup(conf_class: Type[NLPAutoRegressionConfigs], argv: List[str],
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


def run_experiment(conf_class: Type[NLPAutoRegressionConfigs], argv: Optional[List[str]] = None) -> None:
    """Parse `argv`, start a labml experiment (one per rank under torchrun) and train; exits non-zero on failure."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        print(usage(conf_class))
        return
    ctx = init_distributed()
    status = 0
    try:
        _train(conf_class, ctx, _setup(conf_class, argv, ctx))
        # Every rank finishes (rank 0 may still be writing the checkpoint) before the group is torn down
        barrier(ctx)
    except KeyboardInterrupt as e:
        # `stop_for_signal` names the signal after every rank stopped at the same step with a checkpoint
        status = exit_status(e.args[0] if e.args else 2)
        if e.args:
            barrier(ctx)
    except TrainingDiverged as e:
        status = _error(ctx, e, DIVERGED_EXIT_CODE)
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


def _train(conf_class: Type[NLPAutoRegressionConfigs], ctx: DistributedContext,
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
        conf.run()
