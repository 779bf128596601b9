"""CPU weight layouts: Q4 GGUF weights kept packed (int4 for bfloat16, the Q4 x int8 kernel
for float32), int8 copies, and oneDNN-reordered weights.

All must compute what the plain dequantized weights compute: exactly for the reordering,
within bfloat16 rounding for the 4-bit kernel (its scales are rounded to bfloat16), within
int8 activation rounding for the Q4 x int8 kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pikaserve.attention.metadata import AttentionMetadata, ChunkSequence
from pikaserve.kernels import q4_matmul
from pikaserve.llm import LLM
from pikaserve.model.gguf_loader import load_gguf
from pikaserve.model.int4_weights import PackedInt4
from pikaserve.model.llama import Linear

from .conftest import Q

INT4_FILES = [("llama", Q.Q4_0), ("llama", Q.Q4_1), ("llama", Q.Q4_K), ("qwen2", Q.Q4_K)]


def _layer_matrices(names) -> set[str]:
    return {n for n in names if n.startswith("model.layers.") and n.endswith("proj.weight")}


@pytest.mark.parametrize(("arch", "qtype"), INT4_FILES, ids=lambda v: getattr(v, "name", v))
def test_int4_codes_give_back_the_dequantized_weights(tiny_gguf, arch, qtype):
    checkpoint = load_gguf(tiny_gguf(arch, qtype).path, torch.float32, keep_int4=True)
    assert _layer_matrices(checkpoint.int4) == _layer_matrices(checkpoint.tensors)
    assert "model.embed_tokens.weight" not in checkpoint.int4  # looked up, never multiplied
    for name, groups in checkpoint.int4.items():
        # llama q/k rows are un-permuted alike in both forms
        torch.testing.assert_close(
            groups.dequantize(), checkpoint.tensors[name], rtol=1e-6, atol=1e-7, msg=name
        )


def test_no_int4_codes_unless_asked_or_4_bit(tiny_gguf):
    assert not load_gguf(tiny_gguf("llama", Q.Q4_1).path, torch.float32).int4
    assert not load_gguf(tiny_gguf("llama", Q.Q8_0).path, torch.float32, keep_int4=True).int4


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_int4_matmul_equals_the_dequantized_matmul(tiny_gguf, rows):
    checkpoint = load_gguf(tiny_gguf("llama", Q.Q4_1).path, torch.float32, keep_int4=True)
    name = "model.layers.0.mlp.gate_proj.weight"
    x = torch.randn(rows, checkpoint.tensors[name].shape[1]).to(torch.bfloat16)
    got = PackedInt4(checkpoint.int4[name]).matmul(x)
    want = x.float() @ checkpoint.tensors[name].t()
    assert got.dtype == torch.bfloat16
    assert_close_at_scale(got.float(), want)


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, fraction: float = 0.02) -> None:
    """Every element within `fraction` of the largest magnitude: bfloat16 rounding (3 significant
    digits) makes relative error meaningless for the elements near zero."""
    worst = (got - want).abs().max().item()
    assert worst <= fraction * want.abs().max().item(), worst


def prefill_logits(llm: LLM, prompt: list[int], every_row: bool = False, **kw) -> torch.Tensor:
    """The model's next-token logits after `prompt` (after each of its tokens with
    `every_row`), from one prefill pass written to the first KV blocks of an idle engine."""
    n = len(prompt)
    blocks = -(-n // llm.engine.config.block_size)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), rows=None,
                             chunks=[ChunkSequence(0, n, n, torch.arange(blocks))])
    runner = llm.engine.runner
    ids, positions = torch.tensor(prompt), torch.arange(n)
    rows = torch.arange(n) if every_row else torch.tensor([n - 1])
    logits, _ = runner.model(ids, positions, runner.kv_caches, meta, rows, **kw)
    return logits if every_row else logits[0]


def test_model_uses_int4_for_few_rows_and_agrees_with_bf16(tiny_gguf):
    path = str(tiny_gguf("llama", Q.Q4_1).path)
    packed = LLM(path, dtype="bfloat16", int4_max_rows=8)
    plain = LLM(path, dtype="bfloat16", int4_max_rows=0)
    layers = packed.engine.runner.model.layers
    assert all(layer.qkv_proj.int4 is not None and layer.down_proj.int4 for layer in layers)
    assert all(layer.qkv_proj.int4 is None for layer in plain.engine.runner.model.layers)
    # torch's int4 kernel multiplies rows 4 at a time: speculative proposals fill such blocks
    assert packed.engine.runner.model.row_block() == 4
    assert plain.engine.runner.model.row_block() == 1
    for prompt in ([1, 5, 9], [1, 7, 3, 8, 2, 6]):  # a prefill of <= 8 rows: the int4 path
        assert_close_at_scale(prefill_logits(packed, prompt), prefill_logits(plain, prompt))


def test_int4_only_for_bfloat16_on_cpu(tiny_gguf):
    llm = LLM(str(tiny_gguf("llama", Q.Q4_1).path), dtype="float32")
    assert all(layer.qkv_proj.int4 is None for layer in llm.engine.runner.model.layers)


def test_int8_weights_for_few_rows_agree_with_float32(tiny_model_dir):
    """int8 copies (bfloat16 activations) serve passes of <= 2 rows; more rows, and a model
    whose float32 was asked for explicitly, stay exact float32."""
    path = str(tiny_model_dir("llama"))
    int8 = LLM(path, dtype="float32", int8_max_rows=2)
    exact = LLM(path, dtype="float32")
    model = int8.engine.runner.model
    assert model.int8_rows() == 2 and exact.engine.runner.model.int8_rows() == 0
    assert all(layer.gate_up_proj.int8 is not None for layer in model.layers)
    for prompt in ([1, 5], [7]):  # <= 2 rows: the int8 path, ~1% off
        assert_close_at_scale(prefill_logits(int8, prompt), prefill_logits(exact, prompt))
    long_prompt = [1, 7, 3, 8, 2, 6]  # 6 rows, LM head over all 6: float32, bit for bit
    assert torch.equal(prefill_logits(int8, long_prompt, every_row=True),
                       prefill_logits(exact, long_prompt, every_row=True))


def test_int8_weight_matmul_against_float32():
    from pikaserve.model.int8_weights import Int8Weight

    torch.manual_seed(0)
    weight, x = torch.randn(96, 64) * 0.05, torch.randn(3, 64)
    got, want = Int8Weight(weight).matmul(x), x @ weight.T
    assert got.dtype == torch.float32
    assert_close_at_scale(got, want, fraction=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_onednn_reordered_linear_equals_f_linear(dtype):
    factory = {"dtype": dtype, "device": torch.device("cpu")}
    linear = Linear(64, 96, bias=True, factory=factory)
    weight, bias = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    linear.weight.copy_(weight)
    linear.bias.copy_(bias)
    linear.reorder_for_onednn(keep_plain=False)
    if linear.reordered is None:
        # no oneDNN in this torch build, or none for this dtype on this CPU (bfloat16 on AVX2)
        pytest.skip(f"oneDNN takes no {dtype} weights here (torch build or CPU)")
    assert linear.weight is None  # the plain copy is released
    for rows in (1, 7, 64):
        x = torch.randn(rows, 64).to(dtype)
        want = F.linear(x, weight, bias)
        if dtype == torch.bfloat16:
            assert torch.equal(linear(x), want)
        else:
            torch.testing.assert_close(linear(x), want, rtol=1e-5, atol=1e-5)


needs_q4_kernel = pytest.mark.skipif(not q4_matmul.available(), reason="x86 AVX2 kernel")


@needs_q4_kernel
@pytest.mark.parametrize(("arch", "qtype"), INT4_FILES, ids=lambda v: getattr(v, "name", v))
def test_q4_int8_layers_agree_with_float32(tiny_gguf, arch, qtype):
    """float32 + a Q4 GGUF with the integer kernel on: every decoder matmul runs on the 4-bit
    codes (their float weights released), the LM head stays float, and the logits are the
    exact float32 model's within int8 activation rounding, for one row and for many."""
    path = str(tiny_gguf(arch, qtype).path)
    q4 = LLM(path, dtype="float32", q4_int8_matmul="on")
    exact = LLM(path, dtype="float32")
    model = q4.engine.runner.model
    assert model.q4_int8_layers() == 4 * len(model.layers) and model.q4_int8_rows() is None
    assert all(layer.qkv_proj.weight is None and layer.qkv_proj.reordered is None
               for layer in model.layers)
    assert model.q8_int8_head() and model.lm_head.weight is not None  # rows for grammars
    assert exact.engine.runner.model.q4_int8_layers() == 0  # an explicit float32 stays exact
    for prompt in ([3], [1, 7, 3, 8, 2, 6, 4, 9, 5, 2, 11, 13]):
        assert_close_at_scale(prefill_logits(q4, prompt, every_row=True),
                              prefill_logits(exact, prompt, every_row=True), fraction=0.03)


@needs_q4_kernel
def test_q4_int8_for_few_rows_where_it_pays_only(tiny_gguf, monkeypatch):
    """Where the kernel serves passes of a few rows only (AVX512 without VNNI), the layers
    keep their float weights for bigger passes, which stay exact float32."""
    monkeypatch.setattr(q4_matmul.Q4Matmul, "max_rows", lambda self: 2)
    path = str(tiny_gguf("llama", Q.Q4_1).path)
    q4 = LLM(path, dtype="float32", q4_int8_matmul="on")
    exact = LLM(path, dtype="float32")
    model = q4.engine.runner.model
    assert model.q4_int8_layers() == 4 * len(model.layers) and model.q4_int8_rows() == 2
    assert_close_at_scale(prefill_logits(q4, [1, 5]), prefill_logits(exact, [1, 5]),
                          fraction=0.03)
    prompt = [1, 7, 3, 8, 2, 6]
    assert torch.equal(prefill_logits(q4, prompt, every_row=True),
                       prefill_logits(exact, prompt, every_row=True))


def test_q4_int8_refused_where_it_cannot_run(tiny_gguf):
    from pikaserve.config import ConfigError

    with pytest.raises(ConfigError, match="runs float32 models on a CPU"):
        LLM(str(tiny_gguf("llama", Q.Q4_1).path), dtype="bfloat16", q4_int8_matmul="on")
    with pytest.raises(ConfigError, match="q4_int8_matmul must be"):
        LLM(str(tiny_gguf("llama", Q.Q4_1).path), dtype="float32", q4_int8_matmul="yes")
    if q4_matmul.available():
        with pytest.raises(ConfigError, match="Q4_0, Q4_1 or Q4_K"):
            LLM(str(tiny_gguf("llama", Q.Q8_0).path), dtype="float32", q4_int8_matmul="on")


def test_int8_head_beside_the_bfloat16_4_bit_layers(tiny_gguf, tiny_model_dir):
    """bfloat16: the layers keep their 4-bit path and only the LM head gets an int8 copy; a
    model without 4-bit weights gets int8 layers whose outputs stay bfloat16."""
    gguf = LLM(str(tiny_gguf("llama", Q.Q4_1).path), dtype="bfloat16", int8_max_rows=2)
    model = gguf.engine.runner.model
    assert model.lm_head.int8 is not None and model.int8_rows() == 2
    assert all(layer.qkv_proj.int8 is None and layer.qkv_proj.int4 for layer in model.layers)
    path = str(tiny_model_dir("llama"))
    int8 = LLM(path, dtype="bfloat16", int8_max_rows=2)
    plain = LLM(path, dtype="bfloat16")
    assert all(layer.down_proj.int8 is not None for layer in int8.engine.runner.model.layers)
    for prompt in ([1, 5], [7]):
        got = prefill_logits(int8, prompt)
        assert got.dtype == torch.float32
        assert_close_at_scale(got, prefill_logits(plain, prompt), fraction=0.03)
