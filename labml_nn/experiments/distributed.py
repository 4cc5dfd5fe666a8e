"""
---
title: Data-parallel training with PyTorch's distributed engine
summary: Joining a torchrun job (gloo on CPU, nccl on GPU) and the few collective operations the training loop needs.
---

# Data-parallel training

`torchrun --nproc_per_node N -m labml_nn.transformers.feedback.experiment ...` starts $N$ copies of the training
script and tells each its `RANK`, `LOCAL_RANK` and `WORLD_SIZE` in environment variables. Each copy joins the
process group here (gloo on CPU, nccl when CUDA is available), wraps the model in
`torch.nn.parallel.DistributedDataParallel`, and trains on its own rows of every batch. DDP averages the
gradients over the ranks during `backward()`, so every rank takes the same optimizer step and the parameters
stay identical.

`batch_size` is the **global** batch: each of the $N$ ranks trains on `batch_size / N` rows of every batch, so
the loss, its gradients and the hyper-parameters mean the same as on one process.

Without `torchrun` (`WORLD_SIZE` unset or 1) nothing here starts a process group and the helpers are no-ops.
"""

import gc
import os
from dataclasses import dataclass
from typing import Any, Iterable, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Which process this is: `rank` of `world_size`, `local_rank` on its machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank prints, logs to labml, samples and writes checkpoints."""
        return self.rank == 0


def init_distributed() -> DistributedContext:
    """Join the `torchrun` process group if there is one; gloo on CPU, nccl on GPU."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistributedContext()
    if dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(),
                                  int(os.environ.get('LOCAL_RANK', '0')))
    rank = int(os.environ['RANK'])
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl', device_id=torch.device('cuda', local_rank))
    else:
        dist.init_process_group('gloo')
    return DistributedContext(rank, world_size, local_rank)


def process_device(ctx: DistributedContext, use_cuda: bool) -> torch.device:
    """This process's device: its local GPU when `use_cuda` and CUDA is available, else the CPU."""
    if use_cuda and torch.cuda.is_available():
        return torch.device('cuda', ctx.local_rank)
    return torch.device('cpu')


def wrap_ddp(ctx: DistributedContext, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in `DistributedDataParallel` under `torchrun`, else `model` itself."""
    if not ctx.is_distributed:
        return model
    device_ids = [device.index] if device.type == 'cuda' else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shutdown_distributed(ctx: DistributedContext) -> None:
    """
    Destroy the process group, after collecting the objects in reference cycles that may still hold it (a
    `DistributedDataParallel` destroyed after its group aborts the process).
    """
    if ctx.is_distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistributedContext, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (the tensor itself when not distributed)."""
    if not ctx.is_distributed:
        return tensor
    # nccl reduces only CUDA tensors: a CPU tensor (a validation total, a flag) goes through the GPU and back
    device = tensor.device
    if dist.get_backend() == 'nccl' and device.type != 'cuda':
        tensor = tensor.to(torch.device('cuda', torch.cuda.current_device()))
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.to(device)


def broadcast_object(ctx: DistributedContext, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistributedContext, obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.is_distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def max_replica_difference(ctx: DistributedContext, parameters: Iterable[torch.Tensor]) -> float:
    """
    The largest difference of any parameter between any two ranks: 0 when the replicas are identical,
    as data-parallel training must keep them.
    """
    if not ctx.is_distributed:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max().item()


def barrier(ctx: DistributedContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
