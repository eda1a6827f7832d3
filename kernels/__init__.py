"""Triton kernels, each beside the plain-PyTorch reference it must agree with.

Kernels know nothing about models: they take tensors and check them. `mintune/ops.py` decides,
per call, whether the kernel or the reference runs.

`Launch` is how a launcher plans a kernel launch before running it: the same plan is what
`python -m mintune.bench compile` compiles for sm_90 (on meta tensors, without a GPU).
"""
from typing import NamedTuple


class Launch(NamedTuple):
    """One kernel launch, planned: run it, or compile it for the report."""
    kernel: object      # the @triton.jit function
    grid: tuple
    args: tuple         # the positional (non-constexpr) arguments
    meta: dict          # constexpr arguments, and num_warps / num_stages
    config: str         # the configuration, as the compile report names it

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)


def swap_config(module, table: str, key, config):
    """Put `config` in `module.<table>[key]` (a tuple or a dict of configurations); returns a function
    that puts the old one back. For timing the alternatives a kernel file lists (ALTERNATIVES)."""
    entries = getattr(module, table)
    old = entries[key]
    if isinstance(entries, tuple):
        setattr(module, table, entries[:key] + (config,) + entries[key + 1:])
    else:
        entries[key] = config

    def restore():
        if isinstance(entries, tuple):
            setattr(module, table, entries)
        else:
            entries[key] = old
    return restore
