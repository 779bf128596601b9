"""The heads a server answers with: loaded from `--head` specs, checked against the model,
looked up by name or by the JSON schema a chat request asks for.

A spec is `NAME=DIR` (a folder written by `pikaserve heads train`) or the name of a head that
ships inside pikaserve (`pika`: Pika's emotion + learn_score classifier for the default model).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pikaserve.config import ConfigError
from pikaserve.heads.fingerprint import tokenizer_fingerprint, weights_fingerprint
from pikaserve.engine.pooling_params import SpanStates
from pikaserve.heads.head import PARTS, ClassificationHead, HeadLoadError, pool_parts
from pikaserve.heads.schema import canonical

BUILTIN_HEADS = {"pika": Path(str(files("pikaserve.data") / "heads" / "pika"))}


def parse_head_specs(specs: list[str]) -> dict[str, Path]:
    """{name: folder} from `--head` values; ConfigError for a malformed or repeated one."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep:
            if name not in BUILTIN_HEADS:
                raise ConfigError(f"--head {spec}: not a built-in head "
                                  f"({', '.join(BUILTIN_HEADS)}); give NAME=DIR")
            path = BUILTIN_HEADS[name]
        else:
            path = Path(folder).expanduser()
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"--head {spec}: a head name is letters, digits, '-', '_', '.'")
        if name in out:
            raise ConfigError(f"--head {name} is given twice")
        out[name] = path
    return out


class ServedHeads:
    def __init__(self, heads: dict[str, ClassificationHead]) -> None:
        self.heads = heads
        self._by_schema = {canonical(h.info.schema): n for n, h in heads.items()}

    @classmethod
    def load(cls, specs: list[str]) -> "ServedHeads":
        """Reads every head's files now (before the model loads); ConfigError on a bad one."""
        heads = {}
        for name, path in parse_head_specs(specs).items():
            try:
                heads[name] = ClassificationHead.load(path)
            except HeadLoadError as exc:
                raise ConfigError(f"--head {name}: {exc}") from exc
        return cls(heads)

    def check_model(self, model_path: Path, tokenizer: Any, hidden_size: int,
                    num_layers: int) -> None:
        """HeadLoadError unless every head was trained on exactly this model."""
        if not self.heads:
            return
        weights, tok = weights_fingerprint(model_path), tokenizer_fingerprint(tokenizer)
        for name, head in self.heads.items():
            head.check_model(weights, tok, hidden_size, num_layers, name)

    def __bool__(self) -> bool:
        return bool(self.heads)

    def __getitem__(self, name: str) -> ClassificationHead:
        return self.heads[name]

    @property
    def names(self) -> list[str]:
        return list(self.heads)

    def get(self, name: str) -> ClassificationHead | None:
        return self.heads.get(name)

    def for_schema(self, schema: Any) -> str | None:
        """The name of the head whose schema equals `schema` (a dict or JSON text), if any."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                return None
        if not isinstance(schema, dict):
            return None
        return self._by_schema.get(canonical(schema))

    def embedding_layers(self, num_layers: int) -> tuple[int, ...]:
        """Embeddings pool what the first head pools; without a head, the last layer."""
        first = next(iter(self.heads.values()), None)
        return first.layers if first is not None else (num_layers,)


def embed(spans: list[SpanStates]) -> list[list[float]]:
    """Pooling transform for /v1/embeddings: the mean of the input's token states (each
    RMS-normalised, as heads see them) at each layer, concatenated, then L2-normalised for
    cosine similarity."""
    x = torch.stack([pool_parts(s)[PARTS.index("after")].flatten() for s in spans])
    return F.normalize(x, dim=1).tolist()
