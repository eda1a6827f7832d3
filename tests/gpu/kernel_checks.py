"""What every GPU test leans on: the kernels forced on, proof that they ran, and tolerances by dtype.

Imported by the GPU tests and, on a CPU, by tests/test_gpu_suite.py, which shows that these checks
fail when the kernel path is not taken (so a GPU test cannot pass on the references).
"""
import contextlib

import torch

from mintune import ops
from mintune.bench import kernel_mode as forced  # MINTUNE_KERNELS=mode in a block, the user's value restored

# ‖kernel - reference‖ / ‖reference‖ allowed, the reference computed in float32 from the same inputs:
# a few roundings of the input dtype (bf16 keeps 8 bits, fp16 11); float32 runs IEEE dots.
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@contextlib.contextmanager
def kernels_only(*op_names: str):
    """Run the block with the kernels forced on; fail unless each named op was called, and only
    through its Triton kernel."""
    with forced("triton"), ops.recorded() as seen:
        yield seen
    for op in op_names:
        taken = ops.path(seen, op)
        assert taken == "kernel", f"{op}: the {taken} path ran, not (only) the Triton kernel"


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: not finite"
    err = rel_err(got, want)
    assert err <= TOL[dtype] * factor, f"{name}: relative error {err:.2e} > {TOL[dtype] * factor:.0e} ({dtype})"
