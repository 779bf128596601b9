"""Sizes and allocates the paged KV cache tensors from a memory budget."""

from __future__ import annotations

import math
import mmap
import os

import torch

from pikaserve.config import ConfigError, EngineConfig
from pikaserve.model.model_config import ModelConfig

GPU_ACTIVATION_RESERVE = 1 << 30  # bytes kept free on CUDA for activations and the allocator


def bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return int(config.gpu_memory_utilization * total) - used - GPU_ACTIVATION_RESERVE
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(config.cpu_kv_cache_fraction * total_ram)


def num_kv_blocks(
    token_bytes: int, config: EngineConfig, device: torch.device, max_model_len: int
) -> int:
    """How many KV blocks the memory budget holds at `token_bytes` per token (the target's,
    plus a draft model's when one keeps a cache beside it)."""
    num_blocks = kv_budget_bytes(config, device) // (token_bytes * config.block_size)
    # More blocks than every sequence at full length could use is wasted memory.
    blocks_per_seq = -(-max_model_len // config.block_size)
    num_blocks = min(num_blocks, config.max_num_seqs * blocks_per_seq)
    if num_blocks < 1:
        raise ConfigError("no memory is left for the KV cache; lower the model size or raise the budget")
    return int(num_blocks)


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) caches of shape [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [(_zeros(shape, dtype, device), _zeros(shape, dtype, device))
            for _ in range(model.num_layers)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not empty: padded attention reads must see finite values (0 * NaN is NaN).

    On CPU, an anonymous mapping gets pages the kernel zeroes on first touch, so a multi-GB
    cache costs nothing at start-up (torch.zeros would memset it all: seconds). Asking for
    huge pages makes those first touches 512x rarer: with 4 KiB pages, writing a request's
    new keys and values into never-used blocks cost ~4 ms of page faults per Pika request.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    region = mmap.mmap(-1, max(count * torch.empty((), dtype=dtype).element_size(), 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; a hint the kernel may ignore
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=dtype, count=count).view(shape)
