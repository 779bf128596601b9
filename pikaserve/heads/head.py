"""A trained classification head: its recipe, its weights, and the files it lives in.

A head answers every field of a JSON schema from the hidden states of one prefill pass of the
frozen model. The engine returns the states of the prompt's last message (a span) and where
the head's span marker ends inside it (for Pika, "Response to check:"). Each token's state is
RMS-normalised (the residual stream's scale grows with depth) and pooled into three parts: the
mean of the tokens after the marker, the mean of those before it, and the prompt's last token.
Each field has its own recipe: which layers and parts it reads, concatenated and standardised
with the training set's mean and std, then a linear or one-hidden-layer classifier.
Files: `head.json` (schema, labels, recipes, system prompt, fingerprints, training report) and
`head.safetensors` (the tensors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pikaserve.engine.pooling_params import SpanStates
from pikaserve.heads.schema import Field, HeadSchemaError, schema_fields

FORMAT_VERSION = 1
META_FILE = "head.json"
TENSORS_FILE = "head.safetensors"
PARTS = ("after", "before", "last")  # after the marker (mean), before it (mean), last token


class HeadLoadError(ValueError):
    """A head that cannot be served: missing or corrupt files, or made for other weights."""


@dataclass(frozen=True)
class Recipe:
    """How one field is read from the pooled states."""

    layers: tuple[int, ...]  # hidden-state layers (0 = embeddings, i = after layer i)
    pooling: str = "after"  # PARTS joined by "+", e.g. "after+before"
    hidden_units: int = 0  # 0: linear; otherwise one ReLU hidden layer of this width
    class_weighting: bool = True  # weigh classes by inverse frequency in training
    weight_decay: float = 1e-2

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.pooling.split("+"))

    def describe(self) -> str:
        clf = "linear" if not self.hidden_units else f"mlp{self.hidden_units}"
        return (f"layers={','.join(map(str, self.layers))} {self.pooling} {clf} "
                f"{'balanced' if self.class_weighting else 'unweighted'} "
                f"wd={self.weight_decay:g}")


@dataclass
class HeadInfo:
    """Everything in head.json besides the tensors."""

    schema: dict[str, Any]
    recipes: list[Recipe]  # one per schema field, in the schema's order
    span_marker: str | None  # the "after"/"before" split; None: all of the last message
    system_prompt: str | None  # the system message of the prompts it was trained on
    weights_fingerprint: str
    tokenizer_fingerprint: str
    hidden_size: int
    model_name: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # data sizes and dev metrics


@dataclass(slots=True)
class HeadAnswer:
    """One request's answer: per field, the logits over its labels."""

    logits: list[torch.Tensor]

    def probs(self) -> list[list[float]]:
        return [torch.softmax(x, 0).tolist() for x in self.logits]


class ClassificationHead:
    def __init__(self, info: HeadInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.info = info
        self.fields: tuple[Field, ...] = schema_fields(info.schema)
        self.tensors = tensors
        self._check()

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer a field reads: what the engine returns."""
        return tuple(sorted({i for r in self.info.recipes for i in r.layers}))

    # --- prompts ---------------------------------------------------------------------------
    def prompt(self, tokenizer: Any, messages: list[dict[str, Any]]
               ) -> tuple[list[int], int, int]:
        """The chat's token ids (as the server encodes them), where the span starts (the last
        message's content) and where the span marker ends in it."""
        return span_prompt(tokenizer, messages, self.info.span_marker)

    # --- math ------------------------------------------------------------------------------
    def field_input(self, parts: torch.Tensor, layers: tuple[int, ...], index: int
                    ) -> torch.Tensor:
        """[B, len(PARTS), len(layers), H] pooled parts -> field `index`'s standardised
        [B, D] features."""
        recipe, name = self.info.recipes[index], self.fields[index].name
        x = select(parts, layers, recipe).flatten(1)
        return (x - self.tensors[f"{name}.mean"]) / self.tensors[f"{name}.std"]

    def field_logits(self, features: torch.Tensor, index: int) -> torch.Tensor:
        t, p = self.tensors, f"{self.fields[index].name}."
        x = F.linear(features, t[p + "w1"], t[p + "b1"])
        if self.info.recipes[index].hidden_units:
            x = F.linear(F.relu(x), t[p + "w2"], t[p + "b2"])
        return x

    def answer(self, parts: torch.Tensor, layers: tuple[int, ...]) -> list[HeadAnswer]:
        """One answer per row of `parts` [B, len(PARTS), len(layers), H]."""
        with torch.inference_mode():
            per_field = [self.field_logits(self.field_input(parts, layers, i), i)
                         for i in range(len(self.fields))]
        return [HeadAnswer([f[b] for f in per_field]) for b in range(parts.shape[0])]

    def __call__(self, spans: list[SpanStates]) -> list[HeadAnswer]:
        """The engine's pooling transform (the states are at self.layers)."""
        return self.answer(torch.stack([pool_parts(s) for s in spans]), self.layers)

    # --- files -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, **asdict(self.info)}
        meta["fields"] = [{"name": f.name, "labels": list(f.labels)} for f in self.fields]
        (out / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(out / TENSORS_FILE))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "ClassificationHead":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (META_FILE, TENSORS_FILE):
            if not (d / name).is_file():
                raise HeadLoadError(f"head {d}: missing {name}")
        try:
            meta = json.loads((d / META_FILE).read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise HeadLoadError(f"head {d}: unknown format_version "
                                    f"{meta.get('format_version')!r}")
            recipes = [Recipe(**{**r, "layers": tuple(r["layers"])}) for r in meta["recipes"]]
            info = HeadInfo(**{k: v for k, v in meta.items()
                               if k not in ("format_version", "fields", "recipes")},
                            recipes=recipes)
            return cls(info, load_file(str(d / TENSORS_FILE)))
        except HeadLoadError:
            raise
        except HeadSchemaError as exc:
            raise HeadLoadError(f"head {d}: its schema cannot be answered: {exc}") from exc
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as exc:
            raise HeadLoadError(f"head {d}: corrupt {META_FILE} or {TENSORS_FILE}: "
                                f"{type(exc).__name__}: {exc}") from exc

    def check_model(self, weights: str, tokenizer: str, hidden_size: int,
                    num_layers: int, where: str) -> None:
        """Refuses to serve a head made for other weights, tokenizer or shapes."""
        info = self.info
        if info.weights_fingerprint != weights:
            raise HeadLoadError(f"head {where} was trained on other model weights "
                                f"(fingerprint {info.weights_fingerprint}, this model {weights})")
        if info.tokenizer_fingerprint != tokenizer:
            raise HeadLoadError(f"head {where} was trained with another tokenizer (fingerprint "
                                f"{info.tokenizer_fingerprint}, this model {tokenizer})")
        if info.hidden_size != hidden_size or max(self.layers) > num_layers:
            raise HeadLoadError(f"head {where} does not fit this model's shape")

    def _check(self) -> None:
        if len(self.info.recipes) != len(self.fields):
            raise ValueError(f"{len(self.info.recipes)} recipes for {len(self.fields)} fields")
        want: dict[str, tuple[int, ...]] = {}
        for f, r in zip(self.fields, self.info.recipes):
            if not r.layers or any(p not in PARTS for p in r.parts):
                raise ValueError(f"field {f.name!r}: bad recipe {r}")
            dim = len(r.parts) * len(r.layers) * self.info.hidden_size
            width = r.hidden_units or len(f.labels)
            want |= {f"{f.name}.mean": (dim,), f"{f.name}.std": (dim,),
                     f"{f.name}.w1": (width, dim), f"{f.name}.b1": (width,)}
            if r.hidden_units:
                want |= {f"{f.name}.w2": (len(f.labels), width),
                         f"{f.name}.b2": (len(f.labels),)}
        for name, shape in want.items():
            t = self.tensors.get(name)
            if t is None or tuple(t.shape) != shape:
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"tensor {name!r}: expected shape {shape}, found {got}")
        self.tensors = {k: v.float() for k, v in self.tensors.items() if k in want}


def pool_parts(span: SpanStates) -> torch.Tensor:
    """A span's states [T, L, H] -> [len(PARTS), L, H]: the mean after the split, the mean
    before it (zeros when nothing is), the last token; each token RMS-normalised first."""
    x = F.rms_norm(span.states.float(), (span.states.shape[-1],))
    after = x[span.split:] if span.split < x.shape[0] else x[-1:]
    before = x[: span.split].mean(0) if span.split > 0 else torch.zeros_like(x[0])
    return torch.stack([after.mean(0), before, x[-1]])


def select(parts: torch.Tensor, layers: tuple[int, ...], recipe: Recipe) -> torch.Tensor:
    """The recipe's parts and layers out of [B, len(PARTS), len(layers), H]:
    [B, len(recipe.parts) * len(recipe.layers), H]."""
    cols = [layers.index(i) for i in recipe.layers]
    return torch.cat([parts[:, PARTS.index(p), cols] for p in recipe.parts], 1)


def span_prompt(tokenizer: Any, messages: list[dict[str, Any]], marker: str | None
                ) -> tuple[list[int], int, int]:
    """The chat's token ids (as Tokenizer.encode_chat gives them), the first token of the last
    message's content, and the first token after the last `marker` in it (or the content's
    first token, when there is no marker)."""
    text = tokenizer.render_chat(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)

    def token_at(char: int) -> int:
        return next((i for i, (_, end) in enumerate(offsets) if end > char), len(ids) - 1)

    content = str(messages[-1].get("content") or "")
    start = token_at(text.rfind(content)) if content and content in text else len(ids) - 1
    split = start
    if marker and marker in content:
        split = token_at(text.rfind(marker) + len(marker))
    return ids, start, split
