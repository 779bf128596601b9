"""What every checkpoint loader returns: a Hugging Face style config and HF-named tensors.

The GGUF reader and the safetensors reader both produce a `Checkpoint`, so the model code
downstream only ever sees one naming scheme (transformers'), whatever the file format was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pikaserve.model.int4_weights import Int4Groups


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded: missing, corrupt, or of a kind we do not support."""


@dataclass(slots=True)
class Checkpoint:
    """A model's weights and configuration, ready for the model code.

    `config` is a config.json-style dict (model_type, hidden_size, num_key_value_heads,
    rope_theta, rope_scaling, tie_word_embeddings, bos/eos_token_id, ...).
    `tensors` maps transformers parameter names (e.g. "model.layers.0.self_attn.q_proj.weight")
    to tensors; "lm_head.weight" is present only when the embeddings are not tied.
    `int4` holds, under the same names, the 4-bit codes of matrices a GGUF stores as
    Q4_0/Q4_1/Q4_K, when the loader was asked to keep them.
    """

    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    int4: dict[str, Int4Groups] = field(default_factory=dict)
