"""
The repository's shape: how many floors the feedback package's imports stack up, no module too long to read,
and no import-time side effects on PyTorch's global state.

A module's **level**: 1 when it imports no module of the package, else one more than the highest level among the
package modules it imports (anywhere in the file: imports inside functions count too). The implicit import of a
package's `__init__` that every submodule import makes is not counted; an explicit `from package import name` of a
name that is no submodule is an import of `__init__`.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = 'labml_nn.transformers.feedback'
FOLDER = ROOT / Path(*PACKAGE.split('.'))
MODULES = {p.stem for p in FOLDER.glob('*.py')}
MAX_LINES = 500


def _module_of(name: str) -> str:
    """The package module that the dotted `name` (a module, or a name inside one) is in, or `''`."""
    if name == PACKAGE:
        return '__init__'
    if not name.startswith(PACKAGE + '.'):
        return ''
    stem = name[len(PACKAGE) + 1:].split('.')[0]
    return stem if stem in MODULES else '__init__'


def package_imports(module: str) -> Set[str]:
    """The package modules that `module` (a file stem) imports."""
    found = set()
    for node in ast.walk(ast.parse((FOLDER / f'{module}.py').read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                # Relative: `from . import x`, `from .x import y`, from inside this package
                parent = PACKAGE.split('.')[:len(PACKAGE.split('.')) - (node.level - 1)]
                base = '.'.join(parent + ([base] if base else []))
            # `from package import module` imports the module; `from package.module import name` the module
            names = [f'{base}.{a.name}' if base == PACKAGE else base for a in node.names]
        else:
            continue
        found.update(m for m in map(_module_of, names) if m and m != module)
    return found


def levels() -> Dict[str, int]:
    """Every module's level; a cycle of imports is an error."""
    found: Dict[str, int] = {}

    def level(module: str, path: Tuple[str, ...] = ()) -> int:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path + (module,))}")
        if module not in found:
            found[module] = 1 + max((level(m, path + (module,)) for m in package_imports(module)), default=0)
        return found[module]

    for module in sorted(MODULES):
        level(module)
    return found


def test_import_floors():
    found = levels()
    table = ', '.join(f'{m} {n}' for m, n in sorted(found.items(), key=lambda item: (item[1], item[0])))
    # The model (transformer.py) stands on at most three floors of parts, the builder on it, the experiments on that
    assert found['transformer'] <= 4, table
    assert found['build'] <= 5, table
    assert max(found.values()) <= 6, table
    # The parts the model is made of import nothing of the package above them
    assert found['stack'] == found['attention'] == found['fused_records'] == 1, table


def test_level_counts_imports_inside_functions(tmp_path, monkeypatch):
    source = 'def f():\n    from labml_nn.transformers.feedback import fused\n'
    monkeypatch.setattr(sys.modules[__name__], 'FOLDER', tmp_path)
    (tmp_path / 'lazy.py').write_text(source)
    assert package_imports('lazy') == {'fused'}


def test_the_experiments_import_no_model():
    """The training machinery knows a model only through its configs' options: it imports no model package."""
    for path in (ROOT / 'labml_nn' / 'experiments').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith('labml_nn.transformers') for n in names), (path.name, names)


def test_configs_stand_at_most_three_classes_below_labml():
    """Every configs class of the library is at most 3 classes below labml's `BaseConfigs` (labml's own excluded)."""
    import importlib
    import pkgutil

    from labml.configs import BaseConfigs

    import labml_nn
    for module in pkgutil.walk_packages(labml_nn.__path__, 'labml_nn.'):
        importlib.import_module(module.name)

    def depth(cls: type) -> int:
        if cls is BaseConfigs or not cls.__module__.startswith('labml_nn'):
            return 0
        return 1 + max(depth(b) for b in cls.__bases__ if issubclass(b, BaseConfigs))

    def subclasses(cls: type):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = {c for c in subclasses(BaseConfigs) if c.__module__.startswith('labml_nn')}
    deepest = max(ours, key=depth)
    assert len(ours) >= 4 and depth(deepest) <= 3, (deepest, depth(deepest))


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / 'labml_nn').rglob('*.py')
            if (n := len(p.read_text(encoding='utf-8').splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# Run in a fresh interpreter: a snapshot of `torch.nn.modules.module`'s global hooks (and flags), the import, and a
# second snapshot
_HOOKS_SCRIPT = """
import json
import torch.nn.modules.module as m


def snapshot():
    out = {}
    for name in dir(m):
        if name.startswith('_global_'):
            value = getattr(m, name)
            out[name] = sorted(map(repr, value.items())) if isinstance(value, dict) else repr(value)
    return out


before = snapshot()
import labml_nn.transformers.feedback  # noqa: E402,F401
print(json.dumps([before, snapshot()]))
"""


def test_import_leaves_torch_global_hooks_alone():
    result = subprocess.run([sys.executable, '-c', _HOOKS_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ('_global_module_registration_hooks', '_global_parameter_registration_hooks',
                 '_global_forward_hooks', '_global_forward_pre_hooks'):
        assert name in before
    assert after == before
