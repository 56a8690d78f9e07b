"""The process group: one process, or one of several under torchrun (DDP).

    torchrun --nproc_per_node=2 -m vdproj_ext.train --preset smoke --mode e2e

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain process is world 1, rank 0. Every rank
sees the same epoch order and takes its slice of each global batch (data.train_batches), so
the runs' numbers do not depend on the number of processes beyond float rounding.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    """Process-group facts and the few collective operations the experiment needs."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
        if device_arg.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch sees no CUDA device")
        if use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
            torch.backends.cudnn.allow_tf32 = True
            self.device = torch.device("cuda", local if self.world > 1 else
                                       (torch.cuda.current_device()))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    def log(self, msg: str):
        """Print on the main process only."""
        if self.main:
            print(msg, flush=True)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `t` over all processes."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def wrap(self, model: torch.nn.Module, *,
             find_unused_parameters: bool = False) -> torch.nn.Module:
        """The module to train: DDP over the process group, or the model itself.
        find_unused_parameters: some trainable parameter gets no gradient from the loss
        (DDP then looks for them every step instead of waiting for their gradients)."""
        if self.world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
