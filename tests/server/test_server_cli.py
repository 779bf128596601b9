"""`pikaserve serve`: vLLM flags and --config YAML onto the configs, clear start-up failures,
and the seed deployment's launch line starting a real server that shuts down gracefully."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pikaserve.config import EngineConfig, ServerConfig
from pikaserve.data import PIKA
from pikaserve.server import cli

from .conftest import free_port

SEED_FLAGS = ("--model HuggingFaceTB/SmolLM2-135M-Instruct --dtype float16 --host 0.0.0.0 "
              "--port {port} --gpu-memory-utilization 0.15 --max-model-len 2048 "
              "--max-num-seqs 128 --enable-prefix-caching --trust-remote-code "
              "--disable-log-requests")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_every_flag_lands_on_a_config_field():
    for flag in cli.FLAGS:
        owner = EngineConfig if flag.target == "engine" else ServerConfig
        assert flag.field in {f.name for f in dataclasses.fields(owner)}, flag.name


def test_seed_launch_line_maps_onto_the_configs():
    engine, server = cli.build_configs(parse(SEED_FLAGS.format(port=30030).split()))
    assert engine.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (engine.dtype, engine.max_model_len, engine.max_num_seqs) == ("float16", 2048, 128)
    assert engine.gpu_memory_utilization == 0.15 and engine.enable_prefix_caching
    assert (server.host, server.port) == ("0.0.0.0", 30030)
    assert server.disable_log_requests and server.trust_remote_code


def test_defaults_and_toggles():
    engine, server = cli.build_configs(parse([]))
    assert engine.model is None and engine.enable_prefix_caching and engine.enable_chunked_prefill
    assert (server.host, server.port) == ("127.0.0.1", 8000)
    assert engine.structured_output_draft
    engine, _ = cli.build_configs(parse(["--no-enable-prefix-caching", "-tp", "1",
                                         "--no-structured-output-draft"]))
    assert not engine.enable_prefix_caching and not engine.structured_output_draft
    engine, _ = cli.build_configs(parse(["some/model"]))
    assert engine.model == "some/model"


def test_yaml_config_with_flag_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: my/model\nmax-model-len: 1024\nmax_num_seqs: 8\nport: 9000\n"
                    "enable-prefix-caching: false\nserved-model-name: pika\n"
                    "api_key: secret\n")
    engine, server = cli.build_configs(parse(["--config", str(path), "--port", "9100"]))
    assert engine.model == "my/model" and engine.max_model_len == 1024
    assert engine.max_num_seqs == 8 and not engine.enable_prefix_caching
    assert server.port == 9100  # the flag wins over the file
    assert server.served_model_name == ["pika"] and server.api_key == "secret"


def test_heads_from_flags_and_yaml(tmp_path):
    _, server = cli.build_configs(parse(["--head", "pika", "--head", "intent=/heads/intent"]))
    assert server.heads == ["pika", "intent=/heads/intent"]
    path = tmp_path / "serve.yaml"
    path.write_text("head: [pika, other=./dir]\n")
    _, server = cli.build_configs(parse(["--config", str(path)]))
    assert server.heads == ["pika", "other=./dir"]
    path.write_text("head: pika\n")
    assert cli.build_configs(parse(["--config", str(path)]))[1].heads == ["pika"]


@pytest.mark.parametrize("text,message", [
    ("colour: blue\n", "unknown key 'colour'"),
    ("enable-lora: true\n", "does not implement yet"),
    ("speculative-config: [ngram]\n", "must be a mapping"),
    ("speculative-config: '{ngram'\n", "not valid JSON"),
    ("speculative-config: {method: eagle}\n", "method must be 'ngram'"),
    ("speculative-config: {method: draft_model, model: m}\n", "needs num_speculative_tokens"),
    ("max-model-len: lots\n", "not a valid int"),
    ("enable-prefix-caching: 1\n", "true or false"),
    ("- a list\n", "mapping"),
])
def test_bad_yaml_fails_clearly(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cli.ConfigError, match=message):
        cli.build_configs(parse(["--config", str(path)]))


def test_speculative_config_from_the_flag_and_yaml(tmp_path):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    engine, _ = cli.build_configs(parse(["--speculative-config", json.dumps(spec)]))
    assert engine.speculative_config == spec
    assert engine.speculative().prompt_lookup_min == 4
    path = tmp_path / "serve.yaml"
    path.write_text("speculative_config:\n  method: ngram\n  num_speculative_tokens: 2\n")
    engine, _ = cli.build_configs(parse(["--config", str(path)]))
    assert engine.speculative_config == {"method": "ngram", "num_speculative_tokens": 2}
    path.write_text(f"speculative-config: '{json.dumps(spec)}'\n")  # JSON text works too
    assert cli.build_configs(parse(["--config", str(path)]))[0].speculative_config == spec
    assert cli.build_configs(parse([]))[0].speculative_config is None


def test_speculative_config_flag_that_is_not_a_json_object(capsys):
    for text in ("{method: ngram}", "[1, 2]"):
        with pytest.raises(SystemExit):
            parse(["--speculative-config", text])
        assert "--speculative-config" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--speculative-config", '{"method": "draft_model", "num_speculative_tokens": 3}'],
     "the draft_model method needs 'model'"),
    (["--speculative-config", '{"method": "ngram"}'], "needs num_speculative_tokens"),
    (["--tensor-parallel-size", "2"], "tensor_parallel_size=2 is not supported yet"),
    (["--quantization", "awq"], "quantization 'awq' is not supported yet"),
    (["--kv-cache-dtype", "fp8", "--device", "cpu"], "an fp8 KV cache needs a CUDA GPU"),
    (["--kv-cache-dtype", "int8"], "kv_cache_dtype must be one of"),
    (["--attention-backend", "flash"], "attention_backend must be one of"),
    (["--cpu-kernels", "fast"], "cpu_kernels must be one of"),
    (["--dtype", "int3"], "dtype must be one of"),
    (["--model", "/nonexistent/model"], "neither a local path nor"),
    (["--default-response-format", "/nonexistent.json"], "default-response-format"),
    (["--replicas", "0"], "replicas must be >= 1"),
    (["--replicas", "2", "--routing", "random"], "routing must be one of prefix, pow2"),
    (["--kv-offloading-size", "-1"], "kv_offloading_size must be >= 0"),
    (["--kv-offloading-size", "1", "--no-enable-prefix-caching"], "needs prefix caching on"),
])
def test_unsupported_settings_fail_at_start_up(argv, message, capsys):
    assert cli.run(parse(argv)) == 2
    assert message in capsys.readouterr().err


def test_replicas_without_ray_serve_fail_at_start_up(capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("ray") else find_spec(name, *a))
    assert cli.run(parse(["--replicas", "2", "--port", str(free_port())])) == 2
    assert 'pip install "pikaserve[cluster]"' in capsys.readouterr().err


def test_gguf_quantization_needs_a_gguf_model(tiny_model_dir, capsys):
    folder = str(tiny_model_dir("llama"))
    assert cli.run(parse(["--model", folder, "--quantization", "gguf"])) == 2
    assert "needs a .gguf model" in capsys.readouterr().err


def test_unimplemented_vllm_flag_fails_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "pikaserve", "serve", "--enable-lora"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "--enable-lora is a vLLM option that pikaserve does not implement yet" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pikaserve", "serve", "--tensor-parallel-size",
                          "4"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "not supported yet" in out.stderr


def test_model_that_fails_to_load_exits_1(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    out = subprocess.run([sys.executable, "-m", "pikaserve", "serve", "--model", str(broken),
                          "--port", str(free_port())], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 1
    assert "could not load the model" in out.stderr


def _wait_healthy(url: str, proc: subprocess.Popen, log_path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become healthy")


@pytest.mark.slow
def test_seed_launch_line_serves_and_shuts_down_gracefully(tmp_path):
    """The original vLLM launch line, program name changed; then SIGTERM mid-stream."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    argv = [sys.executable, "-m", "pikaserve", "serve", *SEED_FLAGS.format(port=port).split()]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _wait_healthy(url, proc, log_path)
        raw = (PIKA / "seed_request.json").read_bytes()
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        # A stream in flight when SIGTERM arrives still finishes cleanly.
        body = json.loads(raw) | {"stream": True, "max_tokens": 40, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # no new work once shutdown began: refused, or 503 if it got in
                assert httpx.get(f"{url}/health", timeout=5).status_code == 503
            except httpx.TransportError:
                pass
            rest = [line for line in lines if line]
        assert first.startswith("data: {")
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]
                    if json.loads(x[6:]).get("choices")]
        assert finishes[-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    import torch

    if not torch.cuda.is_available():  # --dtype float16 on a CPU: one warning line says so
        assert text.count("float16 has no fast kernels") == 1, text[-3000:]
    with socket.socket() as s:  # nothing listens there any more: a new server could bind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does (TIME_WAIT)
        s.bind(("0.0.0.0", port))
        s.listen()


def test_a_port_in_use_fails_before_the_model_loads(capsys, monkeypatch):
    """uvicorn alone would find out only after loading the model, then exit."""
    def never(*args, **kwargs):
        raise AssertionError("the server started loading")

    monkeypatch.setattr(cli, "serve", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.run(parse(["--port", str(port)])) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_flag_help_shows_the_config_dataclass_default():
    import dataclasses

    from pikaserve.config import EngineConfig, ServerConfig
    from pikaserve.server.cli import FLAGS, help_with_default

    for config in (EngineConfig, ServerConfig):
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for flag in FLAGS:
            default = defaults.get(flag.field, None) if (
                (flag.target == "engine") == (config is EngineConfig)) else None
            if isinstance(default, (int, float, str)) and not isinstance(default, bool) \
                    and default != "" and "default" not in flag.help:
                shown = f"{default:g}" if isinstance(default, float) else str(default)
                assert f"(default: {shown})" in help_with_default(flag), flag.name
