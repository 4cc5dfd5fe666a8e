import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from labml_nn.transformers.feedback.build import ModelConfig, build_transformer  # noqa: E402

# Keep the suite predictable on 2 cores
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Devices for the tests that run on any device: the CPU, and CUDA when there is a GPU
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def make_transformer(kind: str, *, d_model=8, heads=2, d_ff=16, n_layers=2, dropout=0.0, dtype=torch.float64,
                     max_distance=128, memory_span=None, seed=0, randomize=True, fused=True, memory_norm=False,
                     device='cpu', compile=False):
    """A small Feedback Transformer; `randomize` gives every parameter (position tables, w) non-trivial values."""
    torch.manual_seed(seed)
    name = 'feedback_transformer_kv' if kind == 'kv' else 'feedback_transformer'
    config = ModelConfig(name, d_model=d_model, heads=heads, d_ff=d_ff, n_layers=n_layers, dropout=dropout,
                         max_distance=max_distance, memory_span=memory_span, fused=fused, memory_norm=memory_norm,
                         compile=compile)
    model = build_transformer(config).to(device=device, dtype=dtype)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(params=['weighted', 'kv'])
def kind(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    """The CPU, and CUDA when there is a GPU (`experiments/gpu_check.sh` runs the CUDA cases)."""
    return request.param


@pytest.fixture(params=['fused', 'autograd'])
def fused(request):
    """Both training loops: the fused one (`fused.py`) and autograd over the modules."""
    return request.param == 'fused'


def pytest_addoption(parser):
    parser.addoption('--run-slow', action='store_true',
                     help='also run the tests marked slow (the README\'s test command and CI do)')


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselected unless --run-slow")


def pytest_collection_modifyitems(config, items):
    # A quick local run leaves out the slow tests; the README's test command (and so CI) runs them all
    if config.getoption('--run-slow'):
        return
    slow = [item for item in items if 'slow' in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if 'slow' not in item.keywords]
