"""
Data-parallel training under torchrun on CPU (gloo): two processes with batch b each must train exactly like one
process with batch 2b, keep identical parameters, and resume like a single process.
"""


import gc

import pytest
import torch
from conftest import make_transformer
from support import TEXT, TINY, checkpoint_of, run_cli, run_torchrun

from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not TEXT.is_file(),
                                reason='needs torch.distributed and the Tiny Shakespeare file')

# Dropout off, so one process and two see exactly the same computation
ARGS = [*TINY, 'dropout=0.0', 'batch_size=8']


def losses(payload):
    return [h['loss'] for h in payload['history']['train']]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    model = 'feedback_transformer_kv'
    ddp = run_torchrun(tmp_path, [f'model={model}', *ARGS, 'train_steps=3'], uuid='ddp')
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli(tmp_path, [f'model={model}', *ARGS, 'train_steps=3'], uuid='single')
    assert single.returncode == 0, single.stderr[-3000:]

    # Rank 0 writes the checkpoint, into labml's distributed run folder `<uuid>.0`
    a = checkpoint_of(tmp_path, model, 'ddp.0')
    b = checkpoint_of(tmp_path, model, 'single')
    assert not (tmp_path / 'logs' / model / 'ddp.1' / 'checkpoints').exists(), 'only rank 0 writes checkpoints'
    # All ranks hold the same parameters (checked across ranks when the checkpoint is written)
    assert a['progress']['replica_difference'] == 0.0
    # 2 ranks x 4 rows == 1 process x 8 rows: the same loss, step after step, and the same parameters
    assert losses(a) == pytest.approx(losses(b), abs=1e-5, rel=0)
    for key, value in b['model'].items():
        torch.testing.assert_close(a['model'][key], value, rtol=0, atol=1e-5)
    assert len(a['rng']) == 2, 'every rank saved its random state'
    # Only rank 0 prints samples and progress
    assert ddp.stdout.count('Trained ') == 1


@pytest.mark.slow
def test_resume_under_torchrun(tmp_path):
    model = 'feedback_transformer'
    args = [f'model={model}', *ARGS, 'dropout=0.1']
    first = run_torchrun(tmp_path, [*args, 'train_steps=2'], uuid='first')
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_torchrun(tmp_path, ['resume=first', 'train_steps=3'], uuid='resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_torchrun(tmp_path, [*args, 'train_steps=3'], uuid='straight')
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = checkpoint_of(tmp_path, model, 'resumed.0')
    b = checkpoint_of(tmp_path, model, 'straight.0')
    assert losses(a)[2] == pytest.approx(losses(b)[2], abs=1e-6, rel=0)
    assert a['progress']['replica_difference'] == 0.0


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_ranks_worker(rank: int, port: int, out_path: str, worker, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    gathered = [None, None]
    result = worker(rank, *args)
    # The worker's objects (a trainer's DistributedDataParallel among them, often held in reference cycles) go
    # before the process group does: one collected at exit, after the group, aborted the process in a CI run
    # ("terminate called without an active exception")
    gc.collect()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, out_path)
    dist.barrier()
    dist.destroy_process_group()


def run_on_two_ranks(tmp_path, worker, *args) -> list:
    """`worker(rank, *args)` in two processes of a gloo process group; both ranks' results, in rank order."""
    out_path = str(tmp_path / 'two_ranks.pt')
    torch.multiprocessing.spawn(_two_ranks_worker, args=(_free_port(), out_path, worker, args), nprocs=2)
    return torch.load(out_path, weights_only=True)


def _state_model(kind: str):
    torch.manual_seed(0)
    return AutoregressiveModel(10, 8, make_transformer(kind, dtype=torch.float32, randomize=False))


def _state_batches(step: int):
    """Each rank's `[5, 2]` tokens at `step`; together one `[5, 4]` batch."""
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 10, (5, 4), generator=g)


def _train_with_state(model, forward, steps: int, rows: slice):
    """A few SGD steps carrying the detached state across batches (memory across segments)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = None
    for step in range(steps):
        out, state = forward(_state_batches(step)[:, rows], state=state, return_state=True)
        loss = out.logsumexp(-1).mean() - out[..., 0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = state.detach()
    return model


def _ddp_state_worker(rank: int, kind: str):
    model = _state_model(kind)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _train_with_state(model, ddp, 3, slice(2 * rank, 2 * rank + 2))
    return [p.detach() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['weighted', 'kv'])
def test_state_api_and_stack_under_ddp(tmp_path, kind):
    """
    DDP over the state API with memory carried across batches (the key/value `Stack` included): both ranks end
    with the same parameters, equal to one process training on both ranks' rows.
    """
    rank0, rank1 = run_on_two_ranks(tmp_path, _ddp_state_worker, kind)
    model = _state_model(kind)
    _train_with_state(model, model, 3, slice(0, 4))
    for a, b, c in zip(rank0, rank1, model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6)
