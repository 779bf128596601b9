"""The Q4 x int8 matmul kernel (kernels/q4_matmul.c): the arithmetic it promises, on the
shapes and row counts the model gives it, and its build and refusal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pikaserve.config import ConfigError
from pikaserve.kernels import q4_matmul
from pikaserve.machine import AVX2_KERNEL_CAPS, cpu_flags
from pikaserve.model.int4_weights import Int4Groups
from pikaserve.model.q4_int8_weights import Q4Int8Weight
from pikaserve.model.q8_int8_weights import Q8Int8Weight

pytestmark = pytest.mark.skipif(not q4_matmul.available(), reason="x86 AVX2 kernel")


@pytest.fixture(scope="module")
def kernel() -> q4_matmul.Q4Matmul:
    built = q4_matmul.load("on")
    assert built is not None
    return built


def random_groups(n: int, k: int, seed: int) -> Int4Groups:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3
    minimum = -8 * scale + torch.randn(n, k // 32, generator=g) * 1e-3
    return Int4Groups(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8), scale, minimum)


def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized to int8 per group of 32 as the kernels do it (times 127 / max in float32,
    rounded half to even): codes [M, G, 32] and scales [M, G], in float64."""
    m, k = x.shape
    xg = x.float().reshape(m, k // 32, 32)
    top = xg.abs().amax(-1, keepdim=True)  # [M, G, 1]
    inverse = torch.where(top > 0, 127 / top, 0)
    return (xg * inverse).round().double(), (top / 127).squeeze(-1).double()


def reference(x: torch.Tensor, groups: Int4Groups) -> torch.Tensor:
    """What the Q4 kernel computes: integer dot products of the quantized rows with the
    codes, then the group's scales and minimums (in float64 here)."""
    k = x.shape[1]
    a, d = quantized_rows(x)
    codes = groups.codes.double().view(-1, k // 32, 32)  # [N, G, 32]
    dots = torch.einsum("mgk,ngk->mng", a, codes)
    exact = dots * groups.scale.double()[None] + a.sum(-1)[:, None] * groups.minimum.double()[None]
    return (exact * d[:, None]).sum(-1)


@pytest.mark.parametrize("n,k", [(8, 32), (24, 64), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 50])
def test_kernel_computes_the_promised_arithmetic(kernel, n, k, rows):
    groups = random_groups(n, k, seed=n + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = Q4Int8Weight(groups, kernel).matmul(x)
    want = reference(x, groups)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    # float32 accumulation over K / 32 groups: relative to the output's scale
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # and the quantization itself stays within ~1% of the float32 product
    plain = x @ groups.dequantize().T
    assert (got - plain).abs().max() <= 0.02 * plain.abs().max()


def test_strided_rows_zero_groups_and_outliers(kernel):
    """Rows of a wider tensor (as a fused projection's slice), a group of zeros (scale 0)
    and one huge value per row (its group alone loses precision)."""
    groups = random_groups(16, 128, seed=1)
    wide = torch.randn(6, 200, generator=torch.Generator().manual_seed(2))
    wide[:, 40:72] = 0
    wide[:, 5] = 1e4
    x = wide[:, 8:136]  # rows strided by 200
    got = Q4Int8Weight(groups, kernel).matmul(x)
    torch.testing.assert_close(got.double(), reference(x.contiguous(), groups), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n", [8, 13, 96])  # 13: a vocabulary that does not fill a tile
@pytest.mark.parametrize("rows", [1, 3, 5, 9])
def test_q8_kernel_on_q8_0_weights(kernel, n, rows):
    """A Q8_0 weight (int8 codes, a scale per 32) comes back to its own codes, and the Q8
    kernel computes their integer dot products with the quantized rows, then the scales."""
    g = torch.Generator().manual_seed(n * 10 + rows)
    codes = torch.randint(-127, 128, (n, 64, ), generator=g)
    codes.view(n, 2, 32)[..., 0] = 127  # each group's largest code, as Q8_0 stores it
    scale = torch.rand(n, 2, generator=g) * 0.01 + 1e-3
    weight = (codes.view(n, 2, 32).float() * scale[..., None]).view(n, 64)
    x = torch.randn(rows, 64, generator=g)
    got = Q8Int8Weight(weight, kernel).matmul(x)
    a, d = quantized_rows(x)
    want = (torch.einsum("mgk,ngk->mng", a, codes.double().view(n, 2, 32))
            * scale.double()[None] * d[:, None]).sum(-1)
    assert got.shape == (rows, n)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("integer", ["q4", "q8"])
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(kernel, integer):
    """Each row is quantized and summed on its own, in the same order whatever the row count:
    batching and speculation (steps of more rows) leave a row's result as it is alone."""
    groups = random_groups(64, 192, seed=5)
    weight = (Q4Int8Weight(groups, kernel) if integer == "q4"
              else Q8Int8Weight(groups.dequantize(), kernel))
    x = torch.randn(75, 192, generator=torch.Generator().manual_seed(6))  # 3 row blocks
    together = weight.matmul(x)
    for i in (*range(11), 31, 32, 33, 74):
        assert torch.equal(weight.matmul(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(weight.matmul(x[3:9]), together[3:9])
    assert torch.equal(weight.matmul(x[30:70]), together[30:70])


def test_one_thread_and_several_give_the_same_bits(kernel):
    groups = random_groups(96, 256, seed=3)
    x = torch.randn(45, 256, generator=torch.Generator().manual_seed(4))
    weight = Q4Int8Weight(groups, kernel)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = weight.matmul(x)
        torch.set_num_threads(2)
        parallel = weight.matmul(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)  # each output tile is one thread's whole sum


def test_off_and_refusals(monkeypatch):
    assert q4_matmul.load("off") is None
    monkeypatch.setattr(q4_matmul, "available", lambda: False)
    assert q4_matmul.load("auto") is None
    with pytest.raises(ConfigError, match="AVX2"):
        q4_matmul.load("on")


def test_vnni_only_where_the_build_may_use_it(kernel):
    capped = torch.backends.cpu.get_cpu_capability() == "AVX2"
    has_vnni = bool({"avx512_vnni", "avx_vnni"} & set(cpu_flags()))
    assert kernel.vnni == (has_vnni and not capped)


def test_the_avx2_build_too(kernel):
    """On a CPU with VNNI the tests above ran its vpdpbusd path; here they run again capped to
    AVX2, as an AVX2 CPU builds the kernel (vpmaddubsw, int16 sums)."""
    if not kernel.vnni:
        pytest.skip("the tests above ran the AVX2 build")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not avx2_build"],
        env={**os.environ, **AVX2_KERNEL_CAPS}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout


@pytest.mark.parametrize("capability,vnni,rows", [
    ("AVX2", False, None), ("AVX512", True, None), ("AVX512", False, 8),
])
def test_rows_it_serves(kernel, monkeypatch, capability, vnni, rows):
    """Every pass, except on AVX512 without VNNI, where oneDNN's AVX512 float32 wins past a
    few rows."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(kernel, "vnni", vnni)
    assert kernel.max_rows() == rows
