"""`pikaserve serve`: vLLM-compatible flags (and a --config YAML with the same keys) onto
EngineConfig and ServerConfig, checked before the port is bound, then uvicorn.

Precedence: built-in defaults < --config FILE.yaml < command-line flags. A flag whose feature
pikaserve does not have yet fails here, with a message that says so, instead of being ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from pikaserve.config import ConfigError, EngineConfig, ServerConfig
from pikaserve.server.connections import uvicorn_config

if TYPE_CHECKING:
    from pikaserve.heads.served import ServedHeads
    from pikaserve.server.app import ServerState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flag:
    name: str  # flag without dashes; also the YAML key (dashes or underscores)
    target: str  # "engine" | "server"
    # value | bool (store_true) | toggle (--x/--no-x) | list | append | mapping (a JSON object
    # on the command line, a mapping in YAML)
    kind: str = "value"
    type: Callable[[str], Any] = str
    help: str = ""
    aliases: tuple[str, ...] = ()
    dest: str | None = None  # the config field, when not the flag's name

    @property
    def field(self) -> str:
        return self.dest or self.name.replace("-", "_")


FLAGS = (
    Flag("model", "engine", help="local HF folder, .gguf file, or a hub id found in the local "
         "HF cache (default: the embedded SmolLM2-135M-Instruct; nothing is downloaded)"),
    Flag("dtype", "engine", help="auto | bfloat16 | float16 | float32 (default auto); a CPU "
         "asked for float16 runs bf16/fp32 and says so"),
    Flag("device", "engine", help="auto | cpu | cuda[:N] (default auto)"),
    Flag("max-model-len", "engine", type=int, help="context length (default: the model's, "
         "capped at 8192)"),
    Flag("max-num-seqs", "engine", type=int, help="most sequences running at once"),
    Flag("max-num-batched-tokens", "engine", type=int, help="token budget per step"),
    Flag("block-size", "engine", type=int, help="tokens per KV block"),
    Flag("gpu-memory-utilization", "engine", type=float,
         help="CUDA: fraction of device memory for weights + KV; ignored on CPU"),
    Flag("kv-cache-memory-bytes", "engine", type=int, help="explicit KV cache budget in bytes"),
    Flag("enable-prefix-caching", "engine", "toggle", help="reuse KV of shared prompt "
         "prefixes (on by default)"),
    Flag("kv-offloading-size", "engine", type=float, help="GiB of host memory for a second "
         "tier of the prefix cache: evicted cached blocks are kept there and copied back on "
         "a hit (default 0: off)"),
    Flag("enable-chunked-prefill", "engine", "toggle", help="split long prefills across "
         "steps (on by default)"),
    Flag("enforce-eager", "engine", "bool", help="CUDA: run every step eagerly, no CUDA graphs"),
    Flag("max-cudagraph-capture-size", "engine", type=int, help="CUDA: steps of up to this "
         "many tokens replay a captured graph"),
    Flag("kv-cache-dtype", "engine", help="auto (the model dtype) | fp8 (CUDA, e4m3)"),
    Flag("attention-backend", "engine", help="auto | torch | triton (auto: triton on CUDA)"),
    Flag("cpu-kernels", "engine", help="auto | native | torch: CPU norms, rope and decode "
         "attention in C kernels compiled on first use (auto: where a C compiler is found)"),
    Flag("quantization", "engine", help="gguf (a quantized .gguf model) only", aliases=("-q",)),
    Flag("tensor-parallel-size", "engine", type=int, help="1 only", aliases=("-tp",)),
    Flag("seed", "engine", type=int, help="engine random seed"),
    Flag("num-threads", "engine", type=int, help="CPU threads (default: all cores)"),
    Flag("int4-max-rows", "engine", type=int, help="CPU + bfloat16: steps of at most this "
         "many rows multiply by a Q4 GGUF's 4-bit weights directly; 0: never"),
    Flag("int8-max-rows", "engine", type=int, help="CPU: steps of at most this many rows use "
         "int8 copies of the weights on no 4-bit or integer kernel (default 2 when dtype auto "
         "chose float32; 0: never)"),
    Flag("q4-int8-matmul", "engine", help="auto | on | off: CPU + float32 + a Q4 GGUF: "
         "matmuls on the 4-bit codes x int8 activations (x86 AVX2; auto: when dtype auto "
         "chose float32)"),
    Flag("structured-output-draft", "engine", "toggle", help="guess a grammar's next choice "
         "and compute it with the tokens forced after it in the same pass (on by default)"),
    Flag("speculative-config", "engine", "mapping", help="speculative decoding, a JSON "
         "object as vLLM's: {\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
         "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2} (prompt lookup) or "
         "{\"method\": \"draft_model\", \"model\": PATH, \"num_speculative_tokens\": 4} "
         "(a smaller model sharing the tokenizer); default: off"),
    Flag("host", "server", help="address to bind"),
    Flag("port", "server", type=int, help="port to bind"),
    Flag("served-model-name", "server", "list", help="model name(s) clients use; the first "
         "is reported (default: the --model string)"),
    Flag("api-key", "server", help="require 'Authorization: Bearer KEY' on the API "
         "(/health and /metrics stay open)"),
    Flag("disable-log-requests", "server", "bool", help="no per-request log lines"),
    Flag("default-response-format", "server", help="JSON file: an OpenAI response_format or a "
         "bare JSON Schema, applied to chat requests that bring none"),
    Flag("head", "server", "append", help="answer with a classification head: NAME=DIR "
         "(from `pikaserve heads train`) or a built-in name (pika); repeatable",
         dest="heads"),
    Flag("max-request-body-bytes", "server", type=int, help="larger bodies get 413"),
    Flag("timeout-request-head", "server", type=float, help="seconds a connection gets to "
         "send each request's head, then it is closed"),
    Flag("timeout-request-body", "server", type=float, help="seconds a request gets to send "
         "its body, then 408"),
    Flag("timeout-keep-alive", "server", type=int, help="idle seconds between requests "
         "before a connection is closed"),
    Flag("max-connections", "server", type=int, help="open connections past this get 503 "
         "(default: what the descriptor limit allows)"),
    Flag("max-prompts-per-request", "server", type=int, help="prompts x n one API request "
         "may carry"),
    Flag("max-inflight-per-request", "server", type=int, help="engine requests of one API "
         "request in the engine at once; the rest wait their turn, so later requests are not "
         "starved"),
    Flag("max-waiting-requests", "server", type=int, help="refuse new requests with 503 "
         "while this many wait for the engine (0: no limit, the default)"),
    Flag("metrics-prefix", "server", help="metric names are PREFIX:name; vllm "
         "gives vLLM's names, for its dashboards"),
    Flag("trust-remote-code", "server", "bool", help="accepted; pikaserve never runs model code"),
    Flag("replicas", "server", type=int, help="engine replicas on Ray Serve behind this "
         "server, each with its own KV cache (needs pikaserve[cluster]; docs/cluster.md)"),
    Flag("ray-address", "server", help="join this Ray cluster (default: start one in this "
         "process)"),
    Flag("routing", "server", help="prefix | pow2 | round-robin: which replica takes a "
         "request (prefix: the one holding the longest cached prefix of its prompt)"),
    Flag("routing-imbalance-threshold", "server", type=int, help="prefix routing: past this "
         "many more requests in flight than the least loaded replica, a replica gets no "
         "affinity traffic"),
    Flag("uvicorn-log-level", "server", help="critical|error|warning|info|debug|trace"),
    Flag("graceful-shutdown-timeout", "server", type=float,
         help="seconds in-flight requests get to finish after SIGTERM/SIGINT"),
)
BY_KEY = {f.name: f for f in FLAGS}

# vLLM options whose features pikaserve does not have: refused by name, never ignored.
UNSUPPORTED = (
    "pipeline-parallel-size", "data-parallel-size", "enable-lora",
    "lora-modules", "max-lora-rank", "cpu-offload-gb", "swap-space", "tokenizer",
    "tokenizer-mode", "chat-template", "enable-auto-tool-choice", "tool-call-parser",
    "reasoning-parser", "load-format", "download-dir", "revision", "max-logprobs",
    "rope-scaling", "hf-overrides", "distributed-executor-backend", "ssl-keyfile",
    "ssl-certfile", "allowed-origins", "guided-decoding-backend", "structured-outputs-config",
    "pipeline-parallel", "compilation-config", "kv-transfer-config", "limit-mm-per-prompt",
)


def _unsupported_message(name: str) -> str:
    return (f"--{name} is a vLLM option that pikaserve does not implement yet; "
            "remove it (see docs/server.md for the supported flags)")


class _Refuse(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, _unsupported_message(option_string.lstrip("-")))


def help_with_default(flag: Flag) -> str:
    """The flag's help with its default, read from the config dataclass (so the two cannot
    disagree), unless the help explains its default in words."""
    config = EngineConfig if flag.target == "engine" else ServerConfig
    field = next(x for x in dataclasses.fields(config) if x.name == flag.field)
    default = field.default
    if default is dataclasses.MISSING or default is None or default is False or default == "" \
            or "default" in flag.help:
        return flag.help
    return f"{flag.help} (default: {default:g})" if isinstance(default, float) else \
        f"{flag.help} (default: {default})"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="serve the OpenAI-compatible API (vLLM flag names)",
        description="Serve a model over the OpenAI-compatible HTTP API. Flags follow vLLM's "
        "names; --config FILE.yaml takes the same keys, and flags override it.",
    )
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as vLLM's `serve MODEL` (same as --model)")
    p.add_argument("--config", default=None, help="YAML file with flag names as keys")
    for f in FLAGS:
        names = [f"--{f.name}", *f.aliases]
        text = help_with_default(f)
        if f.kind == "bool":
            p.add_argument(*names, action="store_true", default=None, help=text)
        elif f.kind == "toggle":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=None,
                           help=text)
        elif f.kind == "list":
            p.add_argument(*names, nargs="+", default=None, help=text)
        elif f.kind == "append":
            p.add_argument(*names, action="append", dest=f.field, default=None, help=text)
        elif f.kind == "mapping":
            p.add_argument(*names, type=json_object, default=None, metavar="JSON", help=text)
        else:
            p.add_argument(*names, type=f.type, default=None, help=text)
    for name in UNSUPPORTED:
        p.add_argument(f"--{name}", nargs="?", action=_Refuse, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def load_yaml(path: str) -> dict[str, Any]:
    """The --config file as {flag name: value}, every key and value checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return dict(checked_setting(key, value, f"--config {path}") for key, value in data.items())


def checked_setting(key: object, value: Any, source: str) -> tuple[str, Any]:
    """One YAML-style setting as (flag name, value of the flag's type); `source` starts the
    error message. Shared by --config files and `pikaserve tune --space`."""
    name = str(key).replace("_", "-")
    if name in UNSUPPORTED:
        raise ConfigError(f"{source}: {_unsupported_message(name)}")
    flag = BY_KEY.get(name)
    if flag is None:
        raise ConfigError(f"{source}: unknown key {key!r}")
    return name, _yaml_value(flag, value, f"{source}: {flag.name}")


def _yaml_value(flag: Flag, value: Any, where: str) -> Any:
    if value is None:
        return None
    if flag.kind in ("bool", "toggle"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if flag.kind == "mapping":
        if isinstance(value, str):
            try:
                return json_object(value)
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (or a JSON object as a string)")
        return value
    if flag.kind in ("list", "append"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where} must be a string or a list of strings")
        return items
    if isinstance(value, (bool, list, dict)):  # int(True) would "work"; refuse it
        raise ConfigError(f"{where}: {value!r} is not a valid {flag.type.__name__}")
    try:
        return flag.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {flag.type.__name__}") from None


def json_object(text: str) -> dict[str, Any]:
    """A flag's value that is a JSON object, as vLLM's --speculative-config takes."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Defaults < YAML < flags, then validated. Raises ConfigError."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in FLAGS:
        v = getattr(args, f.field, None)
        if v is not None:
            values[f.name] = v
    tag = getattr(args, "model_tag", None)
    if tag is not None:
        if values.get("model") not in (None, tag):
            raise ConfigError(f"two models given: {tag!r} and --model {values['model']!r}")
        values["model"] = tag
    return configs_from_settings(values)


def configs_from_settings(values: dict[str, Any]) -> tuple[EngineConfig, ServerConfig]:
    """{flag name: value} over the defaults, validated. Raises ConfigError."""
    engine = {BY_KEY[k].field: v for k, v in values.items() if BY_KEY[k].target == "engine"}
    server = {BY_KEY[k].field: v for k, v in values.items() if BY_KEY[k].target == "server"}
    engine_config = EngineConfig(**engine)
    server_config = ServerConfig(**server)
    engine_config.validate()
    server_config.validate()
    return engine_config, server_config


def check_port(host: str, port: int) -> None:
    """Fails now, before the model loads, when the address is taken (uvicorn would find out
    only after loading it)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    try:
        engine_config, server_config = build_configs(args)
        from pikaserve.engine.preflight import check_engine_config

        path = check_engine_config(engine_config)
        check_port(server_config.host, server_config.port)
        if server_config.clustered:
            from pikaserve.cluster.launch import check_cluster

            check_cluster(engine_config, server_config)
        from pikaserve.server.sampling import load_default_response_format

        default_rf = load_default_response_format(server_config.default_response_format)
        from pikaserve.heads.served import ServedHeads

        heads = ServedHeads.load(server_config.heads)
    except ConfigError as exc:
        print(f"pikaserve serve: error: {exc}", file=sys.stderr)
        return 2
    if server_config.trust_remote_code:
        logger.info("--trust-remote-code accepted; pikaserve runs no model code anyway")
    logger.info("model %s -> %s", engine_config.model or "(embedded default)", path)
    return serve(engine_config, server_config, default_rf, heads)


def serve(engine_config: EngineConfig, server_config: ServerConfig,
          default_response_format: dict[str, Any] | None = None,
          heads: ServedHeads | None = None) -> int:
    """Runs the server until SIGINT/SIGTERM; returns the process exit status."""
    from pikaserve.server.app import create_app

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    start_engine = None
    if server_config.clustered:
        from pikaserve.cluster.launch import start_cluster

        def start_engine():
            return start_cluster(engine_config, server_config)

    app = create_app(server_config, engine_config=engine_config,
                     default_response_format=default_response_format,
                     on_load_failure=on_load_failure, heads=heads, start_engine=start_engine)
    server = _Server(uvicorn_config(app, server_config), app.state)
    try:
        server.run()
    finally:
        if server_config.clustered:
            from pikaserve.cluster.launch import stop_cluster

            stop_cluster(server_config)
    if failed:
        return 1
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn, plus: new requests get 503 once shutdown starts, and a signal that triggered
    a clean shutdown is not re-raised afterwards (so the exit status stays 0)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.pika_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.pika_state.begin_shutdown()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises these
        if isinstance(captured, list):
            captured.clear()
