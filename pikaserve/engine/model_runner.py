"""Turns a scheduled batch into flat tensors, runs the model, returns logits of sampled rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pikaserve.attention.metadata import AttentionMetadata, ChunkSequence
from pikaserve.engine.request import Request
from pikaserve.engine.scheduler import SchedulerOutput
from pikaserve.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        self.num_forward_passes = 0

    def execute(
        self, out: SchedulerOutput, vocab_rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (float32) of every sampling request that reaches its last known token this
        step, in `out.scheduled`'s order; then, in the same order, those of every such request
        with a draft, at the draft's last token. With `vocab_rows`, only those tokens get
        logits; the others are -inf. Second: the hidden states of the pooling requests' span
        rows computed this step (PooledStates), or None when there are none."""
        bs = self.block_size
        ids, positions, slots, logits_rows, draft_rows = [], [], [], [], []
        hidden_rows: list[int] = []
        pooled_counts: list[tuple[Request, int]] = []
        chunks: list[ChunkSequence] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        row = 0
        for s in out.scheduled:
            req, n, k = s.request, s.num_new_tokens, s.num_draft
            start = req.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(req.block_ids, dtype=np.int64)
            tokens = req.all_token_ids[start : start + n - k]
            ids.append(np.asarray(tokens + req.draft.token_ids if k else tokens, dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                dec_tables.append(req.block_ids)
                dec_lens.append(start + 1)
            else:
                num_blocks = -(-(start + n) // bs)
                mask = None
                if start:  # row i sees the cached tokens and the chunk's first i + 1
                    mask = self._attention_bias(np.arange(start + n)[None, :] <= pos[:, None])
                chunks.append(
                    ChunkSequence(row, n, start + n, self._tensor(table[:num_blocks]), mask)
                )
            if req.is_pooling:
                first = max(start, req.params.first_pooled(req.num_tokens))
                if first < start + n:
                    hidden_rows.extend(range(row + first - start, row + n))
                    pooled_counts.append((req, start + n - first))
            row += n
            if s.samples and not req.is_pooling:
                logits_rows.append(row - 1 - k)
                if k:
                    draft_rows.append(row - 1)

        meta = AttentionMetadata(
            slot_mapping=self._tensor(np.concatenate(slots)),
            num_decode_tokens=len(dec_lens),
            decode_block_tables=None,
            decode_context_len=max(dec_lens, default=0),
            decode_mask=None,
            chunks=chunks,
        )
        if dec_lens:
            width = max(len(t) for t in dec_tables)
            tables = np.zeros((len(dec_tables), width), dtype=np.int64)
            for i, t in enumerate(dec_tables):
                tables[i, : len(t)] = t
            meta.decode_block_tables = self._tensor(tables)
            lens = np.asarray(dec_lens, dtype=np.int64)
            if (lens < meta.decode_context_len).any():
                mask = np.arange(meta.decode_context_len)[None, :] < lens[:, None]
                meta.decode_mask = torch.from_numpy(mask).to(self.device)[:, None, None, :]

        self.num_forward_passes += 1
        layers = tuple(sorted({i for r, _ in pooled_counts for i in r.params.layers}))
        logits, hidden = self.model(
            self._tensor(np.concatenate(ids)),
            self._tensor(np.concatenate(positions)),
            self.kv_caches,
            meta,
            self._tensor(np.asarray(logits_rows + draft_rows, dtype=np.int64)),
            None if vocab_rows is None else self._tensor(np.asarray(vocab_rows, dtype=np.int64)),
            self._tensor(np.asarray(hidden_rows, dtype=np.int64)) if hidden_rows else None,
            layers,
            out.depth,
        )
        pooled = PooledStates(layers, hidden.cpu(), pooled_counts) if pooled_counts else None
        return logits, pooled

    def _attention_bias(self, allowed: np.ndarray) -> torch.Tensor:
        # additive (0 / -inf) in the model dtype: SDPA's CPU kernel takes it ~5% faster than a
        # boolean mask it would convert in every layer
        bias = np.where(allowed, np.float32(0), np.float32("-inf"))
        return torch.from_numpy(bias).to(self.device, self.dtype)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)


@dataclass(slots=True)
class PooledStates:
    """Hidden states of pooling requests' span rows from one pass: `counts` rows per request,
    in order, at the union of their `layers`."""

    layers: tuple[int, ...]
    states: torch.Tensor  # [P, len(layers), H] float32
    counts: list[tuple[Request, int]]

    def keep(self) -> None:
        """Appends each request's rows, at its own layers, to its pooled_states."""
        column = {layer: i for i, layer in enumerate(self.layers)}
        offset = 0
        for req, n in self.counts:
            cols = [column[layer] for layer in req.params.layers]
            req.pooled_states.append(self.states[offset:offset + n][:, cols])
            offset += n
