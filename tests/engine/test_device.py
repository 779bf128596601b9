"""The start-up line (engine/device.describe_cpu): the CPU's features and the kernels chosen."""

from __future__ import annotations

import torch

from pikaserve.engine.device import describe_cpu
from pikaserve.machine import cpu_flags


def test_start_up_line_names_the_cpu_features_and_the_kernels_chosen():
    bf16 = describe_cpu(torch.bfloat16, 12, 0, 0, False, False, None, True)
    assert bf16.startswith(f"CPU flags {' '.join(cpu_flags()) or 'none of note'}; torch kernels ")
    assert "Q4 GGUF weights used as 4-bit for steps of <= 12 rows" in bf16
    assert bf16.endswith("; norms, rope and attention: compiled C kernels")
    fp32 = describe_cpu(torch.float32, 0, 0, 120, True, False, None, False)
    assert ("matmuls float32 (oneDNN, weights reordered once); 120 of them instead on the Q4 "
            "GGUF codes and the LM head's on int8 codes x int8 activations (integer kernels, "
            "AVX2), every step") in fp32
    assert fp32.endswith("; norms, rope and attention: PyTorch ops (SDPA for prefill chunks)")
    fused = describe_cpu(torch.float32, 0, 0, 120, True, False, None, True, True)
    assert fused.endswith("; norms, rope and attention: compiled C kernels, strung together in "
                          "one call per layer for decode steps")
