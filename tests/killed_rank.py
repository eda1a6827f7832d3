"""`python -m mintune.train ARGS...` as one process of a torchrun launch, except that process 1 kills
itself with SIGKILL in the middle of the checkpoint of step $MINTUNE_KILL_AT: after writing its shard,
before the checkpoint is complete (tests/test_distributed.py).

    torchrun --nproc_per_node=2 tests/killed_rank.py CONFIG.toml --train.save_every=1
"""
import os
import signal
import sys

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mintune.train import main

real_save = dcp.save
saves = []


def save_then_die(*args, **kwargs):
    result = real_save(*args, **kwargs)
    saves.append(1)
    if dist.get_rank() == 1 and len(saves) == int(os.environ["MINTUNE_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result


if __name__ == "__main__":
    dcp.save = save_then_die
    sys.exit(main(sys.argv[1:]))
