"""Training heads on pooled hidden states, and choosing each field's recipe by dev accuracy.

The pooled parts of every candidate layer are extracted once (features.py); a candidate recipe
is then a full-batch L-BFGS fit of a small classifier on an [N, D] matrix, well under a second
on a CPU (L-BFGS rather than Adam: the linear case is convex, and it converges to the same
answer every time). Each field is searched on its own, in stages rather than over a full grid:
the best single layer, layer combinations around it (and spread over the middle of the model),
the pooled parts, then classifier width, class weighting and weight decay. A later trial wins
only by more than one dev example, so the simpler recipe tried first keeps a tie.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pikaserve.heads.head import ClassificationHead, HeadInfo, Recipe, select
from pikaserve.heads.schema import Field, schema_fields

MAX_ITERATIONS = 300
POOLINGS = ("after", "after+last", "after+before", "after+before+last", "last")


@dataclass
class Split:
    parts: torch.Tensor  # [N, len(PARTS), len(layers), H] pooled parts (head.pool_parts)
    layers: tuple[int, ...]  # the layers of `parts`
    labels: list[torch.Tensor]  # per field, [N] label indices


@dataclass
class Trial:
    recipe: Recipe
    dev_accuracy: float


def fit(info: HeadInfo, train: Split, seed: int = 0) -> ClassificationHead:
    """A head with `info.recipes`, trained on `train`."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for f, recipe in zip(schema_fields(info.schema), info.recipes):
        x = select(train.parts, train.layers, recipe).flatten(1)
        tensors |= {f"{f.name}.mean": x.mean(0), f"{f.name}.std": x.std(0).clamp_min(1e-6)}
        dim, width, n = x.shape[1], recipe.hidden_units, len(f.labels)
        shapes = {"w1": (width or n, dim), "b1": (width or n,)}
        if width:
            shapes |= {"w2": (n, width), "b2": (n,)}
        for k, shape in shapes.items():
            # a linear head starts at zero; an MLP needs random first weights to break symmetry
            scale = shape[1] ** -0.5 if width and k.startswith("w") else 0.0
            tensors[f"{f.name}.{k}"] = torch.randn(shape, generator=gen) * scale
    head = ClassificationHead(info, tensors)
    for i, (f, y) in enumerate(zip(head.fields, train.labels)):
        _train_field(head, i, f, head.field_input(train.parts, train.layers, i), y)
    return head


def _train_field(head: ClassificationHead, i: int, f: Field, x: torch.Tensor,
                 y: torch.Tensor) -> None:
    recipe = head.info.recipes[i]
    names = [k for k in head.tensors if k.rsplit(".", 1)[0] == f.name
             and k.rsplit(".", 1)[1] in ("w1", "b1", "w2", "b2")]
    params = [head.tensors[k].requires_grad_() for k in names]
    matrices = [head.tensors[k] for k in names if k.endswith(("w1", "w2"))]
    class_weight = _class_weights(y, len(f.labels)) if recipe.class_weighting else None
    opt = torch.optim.LBFGS(params, max_iter=MAX_ITERATIONS, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head.field_logits(x, i), y, weight=class_weight)
        loss = loss + 0.5 * recipe.weight_decay * sum((w * w).sum() for w in matrices)
        loss.backward()
        return loss

    opt.step(closure)
    for k in names:
        head.tensors[k] = head.tensors[k].detach()


def accuracy(head: ClassificationHead, split: Split) -> list[float]:
    """Per field, the share of `split` whose most probable label is the right one."""
    answers = head.answer(split.parts, split.layers)
    return [sum(int(a.logits[i].argmax()) == int(y) for a, y in zip(answers, labels))
            / len(labels) for i, labels in enumerate(split.labels)]


def search(info: HeadInfo, train: Split, dev: Split, fixed: dict | None = None,
           log: Callable[[str, Trial], None] | None = None, max_layer: int | None = None
           ) -> list[list[Trial]]:
    """Per field, the trials of a staged recipe search, best last. `fixed` pins recipe
    fields for every field (e.g. {"layers": (20,)}), which the search then leaves alone;
    `max_layer` bounds the layers it tries."""
    return [_search_field(info, train, dev, i, fixed or {}, log, max_layer)
            for i in range(len(info.recipes))]


def _search_field(info: HeadInfo, train: Split, dev: Split, index: int, fixed: dict,
                  log: Callable[[str, Trial], None] | None, max_layer: int | None
                  ) -> list[Trial]:
    name = schema_fields(info.schema)[index].name
    one = dataclasses.replace(info, schema=_one_field(info.schema, name))
    sub = lambda s: Split(s.parts, s.layers, [s.labels[index]])  # noqa: E731
    train_f, dev_f = sub(train), sub(dev)
    trials: list[Trial] = []

    def trial(**changes) -> Trial:
        recipe = dataclasses.replace(info.recipes[index], **{**changes, **fixed})
        done = next((t for t in trials if t.recipe == recipe), None)
        if done is not None:
            return done
        head = fit(dataclasses.replace(one, recipes=[recipe]), train_f)
        t = Trial(recipe, accuracy(head, dev_f)[0])
        trials.append(t)
        if log is not None:
            log(name, t)
        return t

    margin = 1.5 / len(dev_f.labels[0])  # more than one dev example: not a coin flip

    def better(a: Trial, b: Trial) -> Trial:
        return b if b.dev_accuracy > a.dev_accuracy + margin else a

    num = max(train.layers) if max_layer is None else min(max(train.layers), max_layer)
    step = max(num // 8, 1)
    best = trial(layers=(num // 2,))
    for k in range(2, 9):
        best = better(best, trial(layers=(min(num, max(1, round(num * k / 8))),)))
    b = best.recipe.layers[-1]
    spread = tuple(round(num * k / 8) for k in range(2, 7))  # a quarter to three quarters
    for layers in ((b - step, b), (b, b + step), (b - step, b, b + step),
                   (b - 2 * step, b - step, b, b + step), spread, (num // 2, 3 * num // 4, num)):
        layers = tuple(sorted({i for i in layers if 0 <= i <= num}))
        best = better(best, trial(layers=layers))
    for pooling in POOLINGS:
        best = better(best, trial(layers=best.recipe.layers, pooling=pooling))
    base = best.recipe
    for width in (0, 256):
        for weighting in (True, False):
            for decay in (1e-3, 1e-2, 1e-1, 1.0):
                best = better(best, trial(layers=base.layers, pooling=base.pooling,
                                          hidden_units=width, class_weighting=weighting,
                                          weight_decay=decay))
    trials.remove(best)
    return trials + [best]


def _one_field(schema: dict, name: str) -> dict:
    return {**schema, "properties": {name: schema["properties"][name]}}


def _class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, len(y) / (num_classes * counts.clamp_min(1)), 0.0)


def joined(a: Split, b: Split) -> Split:
    return Split(torch.cat([a.parts, b.parts]), a.layers,
                 [torch.cat([x, y]) for x, y in zip(a.labels, b.labels)])


def split_of(parts: torch.Tensor, layers: Sequence[int], labels: list[list[int]],
             rows: Sequence[int] | None = None) -> Split:
    """A Split of the given rows (all by default) of extracted parts and label columns."""
    idx = list(range(parts.shape[0])) if rows is None else list(rows)
    return Split(parts[idx], tuple(layers), [torch.tensor([col[i] for i in idx])
                                             for col in labels])
