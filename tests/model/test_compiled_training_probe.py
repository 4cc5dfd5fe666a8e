"""
`experiments/benchmark_compiled_training.py` measures the fixed-shape step compiled with the backward AOTAutograd
derives against the fused loop: its compiled loop must compute the fused loop's gradients, or its timings would
compare different functions.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from labml_nn.transformers.feedback.compiled import find_cxx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import benchmark_compiled_training  # noqa: E402


@pytest.mark.skipif(find_cxx() is None, reason="torch.compile on the CPU needs a C++ compiler, and none was found")
def test_compiled_training_probe_matches_fused_gradients(capsys):
    benchmark_compiled_training.main(['--variants', 'kv', '--compiled', 'compiled', '--seq-len', '5', '--batch', '2',
                                      '--d-model', '16', '--heads', '2', '--d-ff', '32', '--n-layers', '2',
                                      '--repeats', '1', '--warm-cache', '--threads', str(torch.get_num_threads())])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fused, compiled = result['results']
    assert (fused['variant'], compiled['variant']) == ('fused', 'compiled')
    assert compiled['max_grad_diff'] < 1e-4
    assert fused['speedup_vs_fused'] == 1.0 and compiled['forward_ms'] > 0 and compiled['backward_ms'] > 0
