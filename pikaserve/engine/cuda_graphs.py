"""CUDA graphs: small steps replay a captured model pass instead of launching ~600 kernels.

A SmolLM2-135M pass on a GPU is launch-bound: its weights stream through an H100 in ~0.1 ms,
while launching each small op from Python takes several. So every step of up to
`max_cudagraph_capture_size` tokens (decodes, drafts, short prefill chunks, any mix) is padded
to the next captured size (1, 2, 4, ... tokens) and replayed. Padding rows write no KV (slot
-1), padding sequences have no queries, and padding logits rows repeat row 0 and are cut off.

Every input lives in one static int64 buffer on the device, packed per size, except the block
tables, which have their own (as wide as the longest possible table): a step copies its packed
inputs and its tables' used rows and columns, then replays. Steps that need hidden states
(pooling) or run fewer layers go eager, as does everything on the torch attention backend.

Without `capture` (CPU tests), the same padded buffers run eagerly: the padding path is then
checked on a CPU against unpadded passes, and only capture and replay are left to a GPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pikaserve.attention.backend import AttentionBackend
from pikaserve.attention.layout import BatchLayout
from pikaserve.attention.triton_backend import (
    PaddedShape, TritonAttentionMetadata, TritonBackend, TritonBatchArrays, batch_arrays,
    split_count)
from pikaserve.engine.forward_inputs import ForwardInputs

logger = logging.getLogger(__name__)


def graph_sizes(max_size: int, max_num_batched_tokens: int) -> list[int]:
    """Powers of two up to the cap (the cap itself last when it is not one)."""
    cap = min(max_size, max_num_batched_tokens)
    sizes = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap]
    return sizes if sizes[-1] == cap else sizes + [cap]


class CudaGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: TritonBackend,
        sizes: list[int],
        table_width: int,  # block-table columns: max_model_len / block_size
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_steps = 0  # steps run through here (replayed, or padded and eager)
        # each size's inputs are views into the front of one buffer, packed in _pack's order
        self.buffer = torch.zeros(self._packed_len(self.sizes[-1]), dtype=torch.int64,
                                  device=device)
        self.tables = torch.zeros((self.sizes[-1], table_width), dtype=torch.int64,
                                  device=device)
        self.inputs = {size: self._views(size) for size in self.sizes}

    @classmethod
    def capture(
        cls, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend, sizes: list[int], table_width: int, device: torch.device,
    ) -> CudaGraphs | None:
        """Captures one graph per size, largest first, sharing one memory pool; logs the time
        and memory it took. None on a backend whose metadata cannot be padded."""
        if not isinstance(backend, TritonBackend):
            logger.info("no CUDA graphs: the %s attention backend runs eagerly", backend.name)
            return None
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(device)[0]
        graphs = cls(model, kv_caches, backend, sizes, table_width, device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(graphs.sizes):
            graphs._forward(size)  # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                graphs.outputs[size] = graphs._forward(size)
            graphs.graphs[size] = graph
        torch.cuda.synchronize(device)
        used = free_before - torch.cuda.mem_get_info(device)[0]
        logger.info(
            "captured %d CUDA graphs (steps of %s tokens) in %.2fs, using %.0f MiB",
            len(graphs.sizes), ", ".join(map(str, graphs.sizes)),
            time.perf_counter() - start, used / 2**20,
        )
        return graphs

    def fits(self, step: ForwardInputs) -> bool:
        return (step.hidden_rows is None and step.depth is None
                and 0 < step.layout.num_tokens <= self.sizes[-1])

    def run(self, step: ForwardInputs) -> tuple[torch.Tensor, None]:
        """The step's logits [R, V] (a view of the graph's output: valid until the next step).
        `step.vocab_rows` is not used: every logit is computed, and the sampler's grammar
        masks leave the same choices."""
        size = next(s for s in self.sizes if s >= step.layout.num_tokens)
        self.num_steps += 1
        arrays = batch_arrays(step.layout, self.backend.block_q, self._shape(size))
        packed = self._pack(step, size, arrays)
        self.buffer[: packed.shape[0]].copy_(torch.from_numpy(packed), non_blocking=True)
        seqs, width = arrays.block_tables.shape
        self.tables[:seqs, :width].copy_(torch.from_numpy(arrays.block_tables), non_blocking=True)
        graph = self.graphs.get(size)
        if graph is None:
            logits = self._forward(size)
        else:
            graph.replay()
            logits = self.outputs[size]
        return logits[: step.logits_rows.shape[0]], None

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, logits_rows, meta = self.inputs[size]
        logits, _ = self.model(ids, positions, self.kv_caches, meta, logits_rows)
        return logits

    # --- packing ------------------------------------------------------------------------
    def _shape(self, size: int) -> PaddedShape:
        return PaddedShape(num_tokens=size, num_seqs=size)

    def _field_lengths(self, size: int) -> list[int]:
        """Lengths of the packed fields: token ids, positions, logits rows, then the
        attention metadata's packed arrays."""
        arrays = batch_arrays(_empty_layout(), self.backend.block_q, self._shape(size))
        return [size, size, size] + [a.size for a in _metadata_arrays(arrays)]

    def _packed_len(self, size: int) -> int:
        return sum(self._field_lengths(size))

    def _views(
        self, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TritonAttentionMetadata]:
        lengths = self._field_lengths(size)
        (ids, positions, logits_rows, slots, context_lens, query_starts, query_lens, qblock_seq,
         qblock_first) = self.buffer[: sum(lengths)].split(lengths)
        meta = TritonAttentionMetadata(
            slots, self.tables[:size], context_lens, query_starts, query_lens, qblock_seq,
            qblock_first, block_q=self.backend.block_q,
            num_splits=split_count(len(qblock_first), self.backend.num_kv_heads))
        return ids, positions, logits_rows, meta

    def _pack(self, step: ForwardInputs, size: int, arrays: TritonBatchArrays) -> np.ndarray:
        t, r = step.layout.num_tokens, step.logits_rows.shape[0]
        head = np.zeros(3 * size, dtype=np.int64)
        head[:t] = step.token_ids
        head[size : size + t] = step.layout.positions
        head[2 * size : 2 * size + r] = step.logits_rows
        return np.concatenate([head] + [a.ravel() for a in _metadata_arrays(arrays)])


def _metadata_arrays(arrays: TritonBatchArrays) -> list[np.ndarray]:
    """The packed ones, in TritonAttentionMetadata's order (the block tables go apart)."""
    return [arrays.slot_mapping, arrays.context_lens, arrays.query_starts,
            arrays.query_lens, arrays.qblock_seq, arrays.qblock_first]


def _empty_layout() -> BatchLayout:
    empty = np.zeros(0, dtype=np.int64)
    return BatchLayout(empty, empty, [], empty, empty, block_size=1)
