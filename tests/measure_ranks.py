"""Under torchrun: the peak each process measures (plan.measure_processes: the model wrapped as training
wraps it, two steps on random rows) for several variants of one recipe, in one launch; process 0 writes
{name: [peak of process 0, peak of process 1, ...]} as JSON (tests/test_distributed.py).

    MINTUNE_CASES='{"name": ["--key=value", ...]}' MINTUNE_PEAKS=OUT.json \\
        torchrun --nproc_per_node=2 tests/measure_ranks.py RECIPE.toml [--key=value ...]

Each case's overrides come after the command line's.
"""
import json
import os
import sys

import torch.distributed as dist

from mintune.plan import measure_processes
from mintune.recipe import load_config

if __name__ == "__main__":
    recipe, common, cases = sys.argv[1], sys.argv[2:], json.loads(os.environ["MINTUNE_CASES"])
    dist.init_process_group("gloo")  # once for every case: measure_processes takes part in it, starts no other
    peaks = {name: measure_processes(load_config(recipe, [*common, *overrides]), "cpu")
             for name, overrides in cases.items()}
    if dist.get_rank() == 0:
        with open(os.environ["MINTUNE_PEAKS"], "w") as f:
            json.dump(peaks, f)
    dist.destroy_process_group()
