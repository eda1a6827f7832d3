"""The int8 kernels compiled for the GPU against their float32 reference: through mintune.ops (forward
and input gradient, proving the kernel ran) at the benchmark's shapes, both paths (fused, dequantize +
cuBLAS) and every split factor, bias, rows that are not contiguous, float16 and float32, grouped scales."""
import pytest
import torch

from kernel_checks import check_close, kernels_only
from mintune import ops
from mintune.kernels import int8_matmul as mm
from mintune.quant import quantize_per_channel


def weights(N, K, group_size=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return quantize_per_channel(torch.randn(N, K, device="cuda", generator=g) * 0.02, group_size)


def through_ops(x, q, s, bias=None):
    """ops.int8_linear forward and input gradient (and bias gradient), the kernel path proven."""
    x = x.detach().requires_grad_(True)
    b = None if bias is None else bias.detach().requires_grad_(True)
    with kernels_only("int8_linear"):
        y = ops.int8_linear(x, q, s, b)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x,) if b is None else (x, b), dy)
    return y, dy, grads


@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 7, 16, 100, 128, 1000, 4096])
@pytest.mark.parametrize("group_size", [None, 128])
def test_llama_shapes_through_ops(M, N, K, group_size):
    q, s = weights(N, K, group_size, seed=M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y, dy, (dx,) = through_ops(x, q, s)
    check_close("y", y, mm.int8_matmul_reference(x.float(), q, s), torch.bfloat16)
    check_close("dx", dx, dy.float() @ mm.dequantize_int8(q, s), torch.bfloat16)


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("M", [1, 16, 128, 4096])
def test_both_paths(path, M):
    q, s = weights(11008, 4096, seed=M)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, 11008, device="cuda", dtype=torch.bfloat16)
    check_close("y", mm.int8_matmul(x, q, s, path=path), mm.int8_matmul_reference(x.float(), q, s), torch.bfloat16)
    check_close("dx", mm.int8_matmul_grad_input(dy, q, s, path=path), dy.float() @ mm.dequantize_int8(q, s),
                torch.bfloat16)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 8, 16])
def test_every_split_factor_and_determinism(split):
    q, s = weights(4096, 4096)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    y = mm.int8_matmul(x, q, s, path="fused", split=split)
    dx = mm.int8_matmul_grad_input(dy, q, s, path="fused", split=split)
    check_close("y", y, mm.int8_matmul_reference(x.float(), q, s), torch.bfloat16)
    check_close("dx", dx, dy.float() @ mm.dequantize_int8(q, s), torch.bfloat16)
    assert torch.equal(y, mm.int8_matmul(x, q, s, path="fused", split=split))  # the same sum, whoever is last
    assert torch.equal(dx, mm.int8_matmul_grad_input(dy, q, s, path="fused", split=split))


def test_bias_and_rows_that_are_not_contiguous():
    q, s = weights(1000, 512)
    big = torch.randn(3, 40, 700, device="cuda", dtype=torch.bfloat16)
    x = big[:, ::2, 100:612]                       # rows 1400 elements apart, last dim contiguous
    bias = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    y, dy, (dx, db) = through_ops(x, q, s, bias)
    check_close("y", y, mm.int8_matmul_reference(x.float(), q, s, bias.float()), torch.bfloat16)
    check_close("dx", dx, dy.float() @ mm.dequantize_int8(q, s), torch.bfloat16)
    check_close("dbias", db, dy.float().sum((0, 1)), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 33, 300])
def test_float16_and_float32(dtype, M):
    q, s = weights(4096, 4096, seed=M)
    x = torch.randn(M, 4096, device="cuda", dtype=dtype)
    y, dy, (dx,) = through_ops(x, q, s)
    check_close("y", y, mm.int8_matmul_reference(x.float(), q, s), dtype)
    check_close("dx", dx, dy.float() @ mm.dequantize_int8(q, s), dtype)


def test_odd_shapes():
    for M, N, K in [(5, 123, 123), (9, 7, 41 * 16), (130, 1000, 200), (1, 64, 4096 + 16)]:
        q, s = weights(N, K, seed=M)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y, dy, (dx,) = through_ops(x, q, s)
        check_close("y", y, mm.int8_matmul_reference(x.float(), q, s), torch.bfloat16)
        check_close("dx", dx, dy.float() @ mm.dequantize_int8(q, s), torch.bfloat16)
