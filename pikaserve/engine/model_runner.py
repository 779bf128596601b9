"""Turns a scheduled batch into flat tensors, runs the model, returns logits of sampled rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pikaserve.attention.backend import AttentionBackend
from pikaserve.attention.layout import LayoutBuilder
from pikaserve.engine.constraint import Draft
from pikaserve.engine.drafts import DraftRows, StepLogits
from pikaserve.engine.forward_inputs import ForwardInputs
from pikaserve.engine.pooling_params import PoolingParams
from pikaserve.engine.request import Request
from pikaserve.engine.scheduler import SchedulerOutput
from pikaserve.model.llama import LlamaForCausalLM

if TYPE_CHECKING:  # imports triton: only on CUDA
    from pikaserve.engine.cuda_graphs import CudaGraphs


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        backend: AttentionBackend,
        graphs: CudaGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.backend = backend
        self.graphs = graphs  # captured passes for small steps (CUDA, without enforce_eager)
        self.dtype = model.embed_tokens.weight.dtype
        self.num_forward_passes = 0

    def execute(
        self, out: SchedulerOutput, vocab_rows: list[int] | None = None
    ) -> tuple[StepLogits, PooledStates | None]:
        """The logits (float32) of every request that samples this step, at its last known token,
        then of every draft, after each of its tokens from Draft.first_verified on, with each
        row's owner (StepLogits). With `vocab_rows`, only those tokens get logits; the others
        are -inf. Second: the hidden states of the pooling requests' span rows computed this
        step (PooledStates), or None when there are none."""
        ids, logits_rows = [], []
        builder = LayoutBuilder(self.block_size)
        sampling: list[Request] = []  # the owner of each row of logits_rows
        draft_rows: list[tuple[Request, Draft, range]] = []  # and its token rows with logits
        hidden_rows: list[int] = []
        pooled_counts: list[tuple[Request, int]] = []
        row = 0
        for s in out.scheduled:
            req, n, k, draft = s.request, s.num_new_tokens, s.num_draft, s.draft
            start = req.num_computed_tokens
            tokens = req.all_token_ids[start : start + n - k]
            if draft is not None:
                tokens = tokens + draft.token_ids
            ids.append(np.asarray(tokens, dtype=np.int64))
            builder.add(req.block_ids, start, n)
            if isinstance(req.params, PoolingParams):
                first = max(start, req.params.first_pooled(req.num_tokens))
                if first < start + n:
                    hidden_rows.extend(range(row + first - start, row + n))
                    pooled_counts.append((req, start + n - first))
            row += n
            if s.samples and not req.is_pooling:
                sampling.append(req)
                logits_rows.append(row - 1 - k)
                if draft is not None:
                    draft_rows.append((req, draft, range(row - k + draft.first_verified, row)))

        self.num_forward_passes += 1
        layers = tuple(sorted({i for r, _ in pooled_counts for i in r.pooling.layers}))
        step = ForwardInputs(
            np.concatenate(ids), builder.build(),
            np.asarray(logits_rows + [r for _, _, rs in draft_rows for r in rs], dtype=np.int64),
            None if vocab_rows is None else np.asarray(vocab_rows, dtype=np.int64),
            np.asarray(hidden_rows, dtype=np.int64) if hidden_rows else None,
            layers, out.depth,
        )
        logits, hidden = self.forward(step)
        drafts: dict[str, DraftRows] = {}
        first = len(logits_rows)
        for req, draft, rs in draft_rows:
            drafts[req.request_id] = DraftRows(draft, list(range(first, first + len(rs))))
            first += len(rs)
        # hidden states come back exactly when the step has hidden rows (pooled_counts)
        pooled = PooledStates(layers, hidden.cpu(), pooled_counts) if hidden is not None else None
        return StepLogits(logits, sampling, drafts), pooled

    def forward(self, step: ForwardInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model pass: replayed from a captured CUDA graph when one fits the step, else
        run eagerly."""
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step)
        meta = self.backend.metadata(step.layout, self.device, self.dtype)
        tensor = self._tensor
        return self.model(
            tensor(step.token_ids), tensor(step.layout.positions), self.kv_caches, meta,
            tensor(step.logits_rows),
            None if step.vocab_rows is None else tensor(step.vocab_rows),
            None if step.hidden_rows is None else tensor(step.hidden_rows),
            step.hidden_layers, step.depth,
        )

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
            cols = [column[layer] for layer in req.pooling.layers]
            req.pooled_states.append(self.states[offset:offset + n][:, cols])
            offset += n
