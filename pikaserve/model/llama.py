"""Llama-family decoder (Llama 2/3, SmolLM, TinyLlama, Qwen2/2.5, Qwen3) over a paged KV cache.

Weights arrive with Hugging Face names; q/k/v and gate/up projections are fused at load time so
each layer runs three matmuls fewer.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pikaserve.attention.backend import AttentionBackend, FusedKernels
from pikaserve.attention.metadata import PagedRows
from pikaserve.kernels.cpu_native import CpuKernels
from pikaserve.kernels.decode_layer import DecodeLayerKernel, LayerArgs
from pikaserve.kernels.q4_matmul import Q4Matmul
from pikaserve.model import onednn_weights, q4_int8_weights, q8_int8_weights
from pikaserve.model.checkpoint import ModelLoadError
from pikaserve.model.int4_weights import Int4Groups, PackedInt4
from pikaserve.model.int4_weights import can_pack as int4_can_pack
from pikaserve.model.int8_weights import Int8Weight
from pikaserve.model.q4_int8_weights import Q4Int8Weight
from pikaserve.model.q8_int8_weights import Q8Int8Weight
from pikaserve.model.model_config import ModelConfig
from pikaserve.model.rope import RotaryEmbedding, apply_rotary

# torch's int4 CPU kernel multiplies rows 4 at a time: SmolLM2's 30 layers took 2.9-3.8 ms at
# 1-4 rows, 5.9-6.3 at 5-8, 8.7-8.8 at 9-12 (bfloat16, this project's CPU). The Q4 x int8
# kernel's time grows row by row past 4 (float32, capped to AVX2: 3.3 ms at 4, 4.1 at 5, 6.2
# at 8), so it has no such block.
INT4_ROW_BLOCK = 4


def _weight(*shape: int, factory: dict) -> nn.Parameter:
    # Uninitialised on purpose: every weight is overwritten from the checkpoint, and random
    # init (or building on the meta device) costs seconds of start-up.
    return nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b, with optional CPU weight layouts picked by the number of rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool, factory: dict) -> None:
        super().__init__()
        self.shape = (out_features, in_features)
        self.weight: nn.Parameter | None = _weight(out_features, in_features, factory=factory)
        self.bias = _weight(out_features, factory=factory) if bias else None
        self.int4: PackedInt4 | None = None
        self.int4_max_rows = 0
        self.int8: Int8Weight | None = None
        self.int8_max_rows = 0
        # on the integer kernels (int8 activations): Q4 codes of a layer, Q8 codes of a head
        self.integer: Q4Int8Weight | Q8Int8Weight | None = None
        self.integer_max_rows: int | None = None  # None: every pass
        self.reordered: torch.Tensor | None = None

    def use_int4(self, groups: Int4Groups, max_rows: int) -> None:
        """Multiply inputs of at most `max_rows` rows by 4-bit weights (model/int4_weights.py)."""
        self.int4, self.int4_max_rows = PackedInt4(groups), max_rows

    def use_q4_int8(self, groups: Int4Groups, kernel: Q4Matmul, max_rows: int | None) -> None:
        """Multiply (float32) inputs of at most `max_rows` rows (None: all) by the 4-bit codes
        with int8 activations (model/q4_int8_weights.py). Serving all, the layer releases its
        float weight: nothing else reads it."""
        self.integer, self.integer_max_rows = Q4Int8Weight(groups, kernel), max_rows
        if max_rows is None:
            self.weight = None

    def use_q8_int8(self, kernel: Q4Matmul, max_rows: int | None) -> None:
        """Multiply (float32) inputs of at most `max_rows` rows (None: all) by the weight's
        int8 codes per group of 32 with int8 activations (model/q8_int8_weights.py). The
        float weight stays (an LM head's rows are taken for grammar-held steps)."""
        self.integer = Q8Int8Weight(self.plain_weight, kernel)
        self.integer_max_rows = max_rows

    def use_int8(self, max_rows: int) -> None:
        """Multiply inputs of at most `max_rows` rows by an int8 copy of the weight
        (model/int8_weights.py)."""
        self.int8, self.int8_max_rows = Int8Weight(self.plain_weight), max_rows

    def reorder_for_onednn(self, keep_plain: bool) -> None:
        """Use a oneDNN-layout copy of the weight (model/onednn_weights.py) where available;
        without `keep_plain` the plain copy is released once it is not needed."""
        self.reordered = onednn_weights.reorder(self.plain_weight)
        if self.reordered is not None and not keep_plain:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer is not None and (
                self.integer_max_rows is None or x.shape[0] <= self.integer_max_rows):
            y = self.integer.matmul(x)
            return y if self.bias is None else y + self.bias
        if self.int4 is not None and x.shape[0] <= self.int4_max_rows:
            y = self.int4.matmul(x)
            return y if self.bias is None else y + self.bias
        if self.int8 is not None and x.shape[0] <= self.int8_max_rows:
            y = self.int8.matmul(x)
            return y if self.bias is None else y + self.bias
        if self.reordered is not None:
            return onednn_weights.linear(x, self.reordered, self.bias)
        return F.linear(x, self.plain_weight, self.bias)

    @property
    def plain_weight(self) -> torch.Tensor:
        """The weight in its plain layout; gone once reorder_for_onednn released it."""
        if self.weight is None:
            raise RuntimeError("the plain weight was released for its oneDNN copy")
        return self.weight


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, factory: dict) -> None:
        super().__init__()
        self.weight = _weight(num, dim, factory=factory)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, factory: dict, kernels: FusedKernels | None) -> None:
        super().__init__()
        self.weight = _weight(dim, factory=factory)
        self.eps = eps
        self.kernels = kernels  # the backend's fused_kernels, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            shape = x.shape
            return self.kernels.rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)
        # normalise in float32 like the reference, scale in the model dtype
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of that sum): one kernel on the triton backend."""
        if self.kernels is not None:
            return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return x, self.forward(x)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, factory: dict, backend: AttentionBackend,
        kernels: FusedKernels | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory, kernels)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, cfg.qkv_bias, factory)
        self.o_proj = Linear(q_size, cfg.hidden_size, False, factory)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, factory, kernels)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, factory, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory, kernels)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, factory)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, factory)
        self.attn = backend.layer(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        pending: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: Any,
        rows_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, pending) -> (x', pending'): the residual stream is x + pending. The previous
        layer's MLP output is added here, fused with this layer's first norm. With
        `rows_out`, every row's keys and values are still written but only those rows go
        on past attention (and come out).

        Sub-modules are called through .forward: nn.Module.__call__ costs a few us a call,
        6-8 calls a layer, ~4% of a CPU decode step (no hooks are ever registered here)."""
        cfg = self.cfg
        if pending is None:
            h = self.input_layernorm.forward(x)
        else:
            x, h = self.input_layernorm.add_forward(x, pending)
        qkv = self.qkv_proj.forward(h)
        qk_heads = cfg.num_heads + cfg.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, qk_heads, cfg.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            heads = cfg.num_heads
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        if self.kernels is not None:  # queries and keys in one go
            qk = self.kernels.rotary(qk, cos_sin[0][:, 0], cos_sin[1][:, 0])
        else:
            qk = apply_rotary(qk, cos_sin)
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
        attn = self.attn.forward(q, k, v, kv[0], kv[1], meta)
        if rows_out is not None:
            x, attn = x[rows_out], attn[rows_out]
        x, h = self.post_attention_layernorm.add_forward(
            x, self.o_proj.forward(attn.reshape(-1, self.q_size)))
        gate_up = self.gate_up_proj.forward(h)
        if self.kernels is not None:
            return x, self.down_proj.forward(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return x, self.down_proj.forward(F.silu(gate) * up)


def _front_on_q4(layer: DecoderLayer) -> bool:
    """Whether the layer's matmuls up to the down projection all run on the Q4 x int8 kernel,
    for every step, beside the compiled CPU kernels (use_decode_layer_kernel)."""
    return isinstance(layer.kernels, CpuKernels) and all(
        isinstance(m.integer, Q4Int8Weight) and m.integer_max_rows is None
        for m in _front_matrices(layer))


def _front_matrices(layer: DecoderLayer) -> tuple[Linear, Linear, Linear]:
    """The layer's matrices before its down projection: qkv, output, gate/up."""
    return layer.qkv_proj, layer.o_proj, layer.gate_up_proj


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        factory = {"dtype": dtype, "device": device}
        kernels = backend.fused_kernels
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, factory)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, factory, backend, kernels) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory, kernels)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, factory)
        self.rope = RotaryEmbedding(cfg, max_positions, dtype).to(device)
        self.requires_grad_(False)
        self.decode_kernel: DecodeLayerKernel | None = None  # use_decode_layer_kernel
        self._decode_args: list[LayerArgs] = []

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: Any,  # the attention backend's metadata for this step
        logits_indices: torch.Tensor,  # [R] rows whose next-token logits are needed
        vocab_rows: torch.Tensor | None = None,  # [V'] the only tokens that can be chosen
        hidden_rows: torch.Tensor | None = None,  # [P] rows whose hidden states are returned
        hidden_layers: tuple[int, ...] = (),  # sorted; 0 = embeddings, i = after layer i
        depth: int | None = None,  # run only the first `depth` layers (then no logits)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [R, V] float32, hidden states [P, len(hidden_layers), H] float32 or None)."""
        x = self.embed_tokens(input_ids)
        pending: torch.Tensor | None = None  # the residual stream is x + pending
        cos_sin = self.rope(positions)
        hidden: list[torch.Tensor] = []  # with hidden_rows: at each of hidden_layers
        if hidden_rows is None and depth is None and self._decodes_in_c(kv_caches, meta):
            x, pending = self._decode_layers(x, cos_sin, kv_caches, meta)
        else:
            # Past the last layer's attention (which writes every row's keys and values) only
            # the logits rows matter: a prefill's other rows skip its output projection and
            # MLP, ~3% of the pass. On the integer kernels each row is computed alone, so the
            # logits keep their bits; kernels picked by row count may pick their few-row one.
            last = len(self.layers) - 1 if (
                hidden_rows is None and depth is None
                and logits_indices.shape[0] < input_ids.shape[0]) else None
            for i, (layer, kv) in enumerate(zip(self.layers, kv_caches[:depth])):
                if hidden_rows is not None and i in hidden_layers:
                    hidden.append(_rows(x, pending, hidden_rows).float())
                rows_out = logits_indices if i == last else None
                x, pending = layer.forward(x, pending, cos_sin, kv, meta, rows_out)
            if last is not None:
                logits_indices = torch.arange(logits_indices.shape[0], device=x.device)
        num_run = len(self.layers) if depth is None else depth
        if hidden_rows is not None and num_run in hidden_layers:
            hidden.append(_rows(x, pending, hidden_rows).float())
        features = torch.stack(hidden, dim=1) if hidden_rows is not None else None
        if depth is not None:
            return x.new_empty((0, self.cfg.vocab_size), dtype=torch.float32), features
        if pending is None:  # no layer ran: the residual stream is x
            normed = self.norm(x[logits_indices])
        else:
            _, normed = self.norm.add_forward(x[logits_indices], pending[logits_indices])
        return self._logits(normed, vocab_rows), features

    def use_decode_layer_kernel(self, kernel: DecodeLayerKernel) -> None:
        """float32 on a CPU with every layer's qkv, output and gate/up matrices on the Q4 x int8
        kernel (for every step) and the compiled CPU kernels: decode steps run each layer's
        front in one C call (kernels/decode_layer.py). Other models keep decode_kernel None."""
        layers, cfg = self.decoder_layers, self.cfg
        float32 = self.embed_tokens.weight.dtype == torch.float32
        if cfg.qkv_bias or cfg.qk_norm or not float32 or not all(map(_front_on_q4, layers)):
            return
        self.decode_kernel = kernel
        self._decode_args = [
            kernel.layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                         *(cast(Q4Int8Weight, m.integer) for m in _front_matrices(layer)))
            for layer in layers]

    def _decodes_in_c(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: Any) -> bool:
        """Whether this step's layers run on the decode-layer kernel: every new token an
        attention row (no prefill chunks) over a float32 KV cache."""
        return (self.decode_kernel is not None and isinstance(meta.rows, PagedRows)
                and not meta.chunks and kv_caches[0][0].dtype == torch.float32)

    def _decode_layers(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                       meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers on the decode-layer kernel: (x, pending) as the layers' loop
        returns them, the same bits."""
        kernel = cast(DecodeLayerKernel, self.decode_kernel)
        cfg, layers = self.cfg, self.decoder_layers
        cos, sin = (t[:, 0].contiguous() for t in cos_sin)
        step = kernel.step(x.shape[0], cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, layers[0].input_layernorm.eps, cfg.head_dim**-0.5,
                           cos, sin, meta.slot_mapping, meta.rows, kv_caches[0][0].shape[1])
        pending: torch.Tensor | None = None
        for layer, args, (k_cache, v_cache) in zip(layers, self._decode_args, kv_caches):
            x, gate_up = kernel.front(args, step, x, pending, k_cache, v_cache,
                                      2 * cfg.intermediate_size)
            pending = layer.down_proj.forward(cast(CpuKernels, layer.kernels).silu_mul(gate_up))
        return x, cast(torch.Tensor, pending)

    def _logits(self, x: torch.Tensor, vocab_rows: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0:  # a step of prefill-only (pooling) requests samples nothing
            return x.new_empty((0, self.cfg.vocab_size), dtype=torch.float32)
        if vocab_rows is None:
            return self.lm_head(x).float()
        logits = torch.full((x.shape[0], self.cfg.vocab_size), float("-inf"), device=x.device)
        part = F.linear(x, self.lm_head.plain_weight.index_select(0, vocab_rows))
        return logits.index_copy_(1, vocab_rows, part.float())

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up; consumes `tensors`."""
        own = dict(self.named_parameters())
        take = _Taker(tensors)
        own["embed_tokens.weight"].copy_(take("model.embed_tokens.weight"))
        own["norm.weight"].copy_(take("model.norm.weight"))
        if self.cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            own["lm_head.weight"].copy_(take("lm_head.weight"))
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv = [take(f"{attn}{n}_proj.weight") for n in "qkv"]
            own[f"layers.{i}.qkv_proj.weight"].copy_(torch.cat(qkv))
            if self.cfg.qkv_bias:
                own[f"layers.{i}.qkv_proj.bias"].copy_(
                    torch.cat([take(f"{attn}{n}_proj.bias") for n in "qkv"])
                )
            own[f"layers.{i}.o_proj.weight"].copy_(take(attn + "o_proj.weight"))
            if self.cfg.qk_norm:
                own[f"layers.{i}.q_norm.weight"].copy_(take(attn + "q_norm.weight"))
                own[f"layers.{i}.k_norm.weight"].copy_(take(attn + "k_norm.weight"))
            own[f"layers.{i}.gate_up_proj.weight"].copy_(
                torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
            )
            own[f"layers.{i}.down_proj.weight"].copy_(take(mlp + "down_proj.weight"))
            own[f"layers.{i}.input_layernorm.weight"].copy_(take(p + "input_layernorm.weight"))
            own[f"layers.{i}.post_attention_layernorm.weight"].copy_(
                take(p + "post_attention_layernorm.weight")
            )

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """`layers`, typed (an nn.ModuleList yields plain Modules)."""
        return cast(list[DecoderLayer], list(self.layers))

    def _int4_layers(self, int4: dict[str, Int4Groups]) -> list[tuple[Linear, Int4Groups]]:
        """The decoder layers' linear layers whose weights are all in `int4` (HF names), with
        their (fused) 4-bit weights."""
        found = []
        for i, layer in enumerate(self.decoder_layers):
            attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            linears = [
                (layer.qkv_proj, [attn + "q_proj", attn + "k_proj", attn + "v_proj"]),
                (layer.o_proj, [attn + "o_proj"]),
                (layer.gate_up_proj, [mlp + "gate_proj", mlp + "up_proj"]),
                (layer.down_proj, [mlp + "down_proj"]),
            ]
            for linear, names in linears:
                weights = [int4[n + ".weight"] for n in names if n + ".weight" in int4]
                if len(weights) == len(names):
                    found.append((linear, Int4Groups.cat(weights)))
        return found

    def use_int4(self, int4: dict[str, Int4Groups], max_rows: int) -> None:
        """Give every linear layer whose weights are all in `int4` (HF names) a packed 4-bit
        copy, used for passes of at most `max_rows` rows."""
        for linear, groups in self._int4_layers(int4):
            if int4_can_pack(linear.shape):
                linear.use_int4(groups, max_rows)
        if "lm_head.weight" in int4 and int4_can_pack(self.lm_head.shape):
            self.lm_head.use_int4(int4["lm_head.weight"], max_rows)

    def use_q4_int8(self, int4: dict[str, Int4Groups], kernel: Q4Matmul) -> None:
        """float32 on a CPU: every decoder linear layer whose weights are all in `int4` runs
        on the integer Q4 x int8 kernel (model/q4_int8_weights.py), for as many rows as it
        is faster here. After load_hf_tensors (it may release the float weights). The LM head
        has its own (use_q8_int8_head)."""
        for linear, groups in self._int4_layers(int4):
            if q4_int8_weights.can_pack(linear.shape):
                linear.use_q4_int8(groups, kernel, kernel.max_rows())

    def use_q8_int8_head(self, kernel: Q4Matmul) -> None:
        """float32 on a CPU: the LM head on the Q8 x int8 kernel (model/q8_int8_weights.py),
        for as many rows as it is faster here; it gives a row the same bits at any row count,
        unlike torch's int8 kernel for 1-2-row steps."""
        if q8_int8_weights.can_pack(self.lm_head.shape):
            self.lm_head.use_q8_int8(kernel, kernel.max_rows())

    def q4_int8_layers(self) -> int:
        """How many linear layers run on the Q4 x int8 kernel."""
        return sum(isinstance(m.integer, Q4Int8Weight) for m in self._integer_linears())

    def q8_int8_head(self) -> bool:
        """Whether the LM head runs on the Q8 x int8 kernel."""
        return isinstance(self.lm_head.integer, Q8Int8Weight)

    def q4_int8_vnni(self) -> bool:
        """Whether the integer kernels were built with VNNI."""
        return any(m.integer.kernel.vnni for m in self._integer_linears() if m.integer)

    def q4_int8_rows(self) -> int | None:
        """The most rows a step may have for the integer kernels to serve it (None: every
        step; meaningful where q4_int8_layers() > 0)."""
        limits = [m.integer_max_rows for m in self._integer_linears()]
        rows = [r for r in limits if r is not None]
        return None if len(rows) < len(limits) else max(rows, default=0)

    def _integer_linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear) and m.integer is not None]

    def row_block(self) -> int:
        """The rows the decoder's matmul kernels multiply together, a block costing about the
        same part-filled or full: 4 on torch's int4 kernel, else 1."""
        return INT4_ROW_BLOCK if self.int4_rows() > 0 else 1

    def int4_rows(self) -> int:
        """The most rows a step may have for the layers to use their 4-bit weights (0: none)."""
        return max((m.int4_max_rows for m in self.modules()
                    if isinstance(m, Linear) and m.int4 is not None), default=0)

    def use_int8(self, max_rows: int) -> None:
        """CPU: every matmul on neither a 4-bit path (int4) nor the integer kernels (both
        faster on the rows int8 takes), the LM head included, gets an int8 copy of its weight for passes of at most
        `max_rows` rows (model/int8_weights.py). Before reorder_for_onednn, which may drop the
        plain weights."""
        for layer in self.decoder_layers:
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                if linear.integer is None and linear.int4 is None:
                    linear.use_int8(max_rows)
        if self.lm_head.integer is None:
            self.lm_head.use_int8(max_rows)

    def int8_rows(self) -> int:
        """The most rows a step may have for the layers to use their int8 weights (0: none)."""
        return self.lm_head.int8_max_rows if self.lm_head.int8 is not None else 0

    def reorder_for_onednn(self) -> None:
        """CPU: reorder every matmul weight once (model/onednn_weights.py). The LM head keeps
        its plain weight: it may be the embedding table, and grammar-held steps take rows of it."""
        for layer in self.decoder_layers:
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                if linear.weight is not None:  # None: on the Q4 x int8 kernel for every pass
                    linear.reorder_for_onednn(keep_plain=False)
        self.lm_head.reorder_for_onednn(keep_plain=True)


def _rows(x: torch.Tensor, pending: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the residual stream x + pending."""
    return x[rows] if pending is None else x[rows] + pending[rows]


class _Taker:
    """Pops named tensors, turning a missing name into a clear load error."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __call__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors.pop(name)
        except KeyError:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}") from None
