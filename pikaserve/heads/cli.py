"""`pikaserve heads train`: a head for a model from labelled JSONL, its recipe chosen on a dev
split (or taken from an earlier head), saved as head.json + head.safetensors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path

from pikaserve.config import ConfigError, EngineConfig
from pikaserve.heads.train import POOLINGS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("heads", help="classification heads on the frozen model",
                       description="Train classification heads on the frozen model's hidden "
                       "states, answered from one forward pass (docs/heads.md).")
    hs = p.add_subparsers(dest="heads_command", required=True)
    t = hs.add_parser(
        "train", help="train a head from labelled JSONL",
        description="Train one classifier per field of a JSON schema on the frozen model's "
        "hidden states at the last prompt token (docs/heads.md).")
    t.add_argument("--model", default=None, help="local HF folder or .gguf (default: the "
                   "embedded SmolLM2-135M-Instruct)")
    t.add_argument("--data", required=True, help="labelled JSONL (see docs/heads.md)")
    t.add_argument("--dev", default=None, help="labelled JSONL to choose the recipe on "
                   "(default: --dev-fraction of --data)")
    t.add_argument("--dev-fraction", type=float, default=0.2, help="without --dev: the share "
                   "of --data held out to choose the recipe on (0.2)")
    t.add_argument("--refit-on-dev", action="store_true", help="once the recipe is chosen, "
                   "train the head on the train and dev data together")
    t.add_argument("--schema", required=True, help="JSON Schema of the answer (object of "
                   "enum / boolean properties), or an OpenAI response_format file")
    t.add_argument("--system-prompt", default=None, help="text file: the system message "
                   "every request carries")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--span-marker", default=None, help="pool the prompt's tokens after the "
                   "last occurrence of this text (default: the last message's content)")
    t.add_argument("--layers", default=None, help="fix the layers, e.g. 16 or 12,20")
    t.add_argument("--max-layer", type=int, default=None, help="search no layer above this: "
                   "steps of head requests then skip the layers above (shallow passes)")
    t.add_argument("--pooling", choices=POOLINGS, default=None, help="fix the pooling")
    t.add_argument("--hidden-units", type=int, default=None, help="fix the classifier: 0 = "
                   "linear, N = one hidden layer of N units")
    t.add_argument("--weight-decay", type=float, default=None,
                   help="fix the L2 weight decay (default: searched, 1e-3 to 1)")
    t.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=None,
                   help="fix whether classes are weighted by inverse frequency (default: "
                   "searched)")
    t.add_argument("--recipes-from", default=None, metavar="DIR", help="no search: train "
                   "with the recipes of the head in DIR (same field names), e.g. to retrain "
                   "it on more data; only their layers are extracted")
    t.add_argument("--dtype", default="auto", help="the model's dtype for the features "
                   "(auto, as the server would run it)")
    t.add_argument("--seed", type=int, default=0, help="seed of the dev split and the "
                   "classifiers' first weights (0)")
    t.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from pikaserve.heads.data import DataError
    from pikaserve.heads.head import HeadLoadError
    from pikaserve.heads.schema import HeadSchemaError
    from pikaserve.model.checkpoint import ModelLoadError

    try:
        head, trials = train(args)
    except (ConfigError, DataError, HeadLoadError, HeadSchemaError, ModelLoadError,
            OSError) as exc:
        print(f"pikaserve heads train: error: {exc}", file=sys.stderr)
        return 2
    out = head.save(args.out)
    print(_table(head, trials))
    print(f"saved {out}")
    return 0


def train(args: argparse.Namespace):
    """(the trained head, per field its recipe trials, best last)."""
    from pikaserve.engine.llm_engine import LLMEngine
    from pikaserve.heads.data import load_labelled
    from pikaserve.heads.features import pooled_parts
    from pikaserve.heads.fingerprint import tokenizer_fingerprint, weights_fingerprint
    from pikaserve.heads.head import HeadInfo, Recipe, span_prompt
    from pikaserve.heads.schema import schema_fields
    from pikaserve.heads.train import Trial, accuracy, fit, joined, search, split_of

    schema = read_schema(args.schema)
    fields = schema_fields(schema)
    recipes = _recipes_from(args, [f.name for f in fields]) if args.recipes_from else None
    system = Path(args.system_prompt).read_text(encoding="utf-8") if args.system_prompt else None
    data = load_labelled(args.data, fields, system)
    dev, dev_rows, train_rows = None, None, None
    if args.dev:
        dev = load_labelled(args.dev, fields, system)
    else:
        if not 0 < args.dev_fraction < 1:
            raise ConfigError("--dev-fraction must be in (0, 1)")
        order = list(range(len(data)))
        random.Random(args.seed).shuffle(order)
        cut = max(1, int(len(order) * args.dev_fraction))
        dev_rows, train_rows = sorted(order[:cut]), sorted(order[cut:])

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, seed=args.seed))
    layers = tuple(range(engine.model_config.num_layers + 1))
    if recipes is not None:  # only the layers the recipes read
        layers = tuple(sorted({i for r in recipes for i in r.layers}))
        if layers[-1] > engine.model_config.num_layers:
            raise ConfigError(f"--recipes-from: layer {layers[-1]} is not in this model")
    if args.max_layer is not None and not 1 <= args.max_layer <= layers[-1]:
        raise ConfigError(f"--max-layer must be in [1, {layers[-1]}]")
    started = time.perf_counter()
    tok = engine.tokenizer

    def parts(messages, label):
        prompts = [span_prompt(tok, m, args.span_marker) for m in messages]
        return pooled_parts(engine, prompts, layers, label)

    train_parts = parts(data.messages, "features (train)")
    train_split = split_of(train_parts, layers, data.labels, train_rows)
    if dev is None:
        dev_split = split_of(train_parts, layers, data.labels, dev_rows)
    else:
        dev_split = split_of(parts(dev.messages, "features (dev)"), layers, dev.labels)
    info = HeadInfo(
        schema=schema, recipes=[Recipe(layers=(layers[-1],))] * len(fields),
        span_marker=args.span_marker, system_prompt=system,
        weights_fingerprint=weights_fingerprint(engine.model_path),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        hidden_size=engine.model_config.hidden_size, model_name=engine.model_path.name,
    )
    if recipes is None:
        trials = search(info, train_split, dev_split, _fixed(args),
                        log=lambda name, t: logger.info("%s: %s -> dev %.3f", name,
                                                        t.recipe.describe(), t.dev_accuracy),
                        max_layer=args.max_layer)
    else:
        given = dataclasses.replace(info, recipes=recipes)
        dev_acc = accuracy(fit(given, train_split, args.seed), dev_split)
        trials = [[Trial(r, a)] for r, a in zip(recipes, dev_acc)]
    info = dataclasses.replace(info, recipes=[t[-1].recipe for t in trials], training={
        "train_examples": len(train_split.labels[0]), "dev_examples": len(dev_split.labels[0]),
        "dev_accuracy": {f.name: t[-1].dev_accuracy for f, t in zip(fields, trials)},
        "refit_on_dev": args.refit_on_dev,
        "seconds": round(time.perf_counter() - started, 1),
        "data": Path(args.data).name, "dtype": str(engine.dtype).removeprefix("torch."),
    })
    final = joined(train_split, dev_split) if args.refit_on_dev else train_split
    return fit(info, final, args.seed), trials


def read_schema(path: str) -> dict:
    """A JSON Schema file, or an OpenAI response_format holding one."""
    from pikaserve.heads.schema import HeadSchemaError

    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HeadSchemaError(f"{path}: {exc}") from exc
    if isinstance(obj, dict) and obj.get("type") == "json_schema":
        obj = (obj.get("json_schema") or {}).get("schema")
    return obj


def _recipes_from(args: argparse.Namespace, names: list[str]) -> list:
    """The recipes of the head in --recipes-from, which must answer fields of these names."""
    from pikaserve.heads.head import ClassificationHead

    if _fixed(args) or args.max_layer is not None:
        raise ConfigError("--recipes-from takes the whole recipe: give it without --layers, "
                          "--max-layer, --pooling, --hidden-units, --weight-decay or "
                          "--class-weighting")
    head = ClassificationHead.load(args.recipes_from)
    have = [f.name for f in head.fields]
    if have != names:
        raise ConfigError(f"--recipes-from {args.recipes_from}: its head answers the fields "
                          f"{have}, the schema has {names}")
    return list(head.info.recipes)


def _fixed(args: argparse.Namespace) -> dict:
    fixed = {}
    if args.layers:
        try:
            fixed["layers"] = tuple(sorted({int(x) for x in args.layers.split(",")}))
        except ValueError:
            raise ConfigError(
                f"--layers must be comma-separated integers: {args.layers}") from None
    if args.pooling is not None:
        fixed["pooling"] = args.pooling
    if args.hidden_units is not None:
        fixed["hidden_units"] = args.hidden_units
    if args.weight_decay is not None:
        fixed["weight_decay"] = args.weight_decay
    if args.class_weighting is not None:
        fixed["class_weighting"] = args.class_weighting
    return fixed


def _table(head, trials) -> str:
    lines = ["recipe search (dev accuracy), best last:"]
    for f, field_trials in zip(head.fields, trials):
        lines.append(f"  {f.name}:")
        lines += [f"    {t.recipe.describe():56s} {t.dev_accuracy:.3f}" for t in field_trials]
    return "\n".join(lines)
