"""The default CPU dtype (bfloat16) gives the fp32 reference's Pika answers.

Measured 40/40 identical answers on this project's CPU; the test allows two of the 40 to
differ, since rounding may break a near-tie on other CPUs. Every answer must be valid.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pikaserve.data import pika_answer_schema, pika_messages, pika_turns
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.llm import LLM
from pikaserve.machine import AVX2_KERNEL_CAPS

MIN_AGREEMENT = 38  # of 40

LABELS = set(pika_answer_schema()["properties"]["emotion"]["enum"])


def answers(llm: LLM) -> list[dict]:
    so = StructuredOutputsParams(json=pika_answer_schema())
    params = SamplingParams(max_tokens=50, temperature=0, structured_outputs=so)
    outs = llm.generate([pika_messages(t) for t in pika_turns()], params)
    return [json.loads(o.text) for o in outs]


@pytest.mark.slow
def test_bf16_matches_fp32_on_pika_turns(default_llm_fp32):
    reference = answers(default_llm_fp32)
    lower = answers(LLM(None, dtype="bfloat16"))
    for answer in reference + lower:
        assert answer["emotion"] in LABELS and isinstance(answer["learn_score"], bool)
    assert sum(a == b for a, b in zip(reference, lower)) >= MIN_AGREEMENT


AVX2_PROBE = """
import json, os, sys
import torch
from pikaserve.llm import LLM
from pikaserve.machine import AVX2_KERNEL_CAPS
from pikaserve.engine.device import cpu_has_fast_bf16
sys.path.insert(0, os.environ["TESTS_DIR"])
from test_precision_agreement import answers
llm = LLM()
print(json.dumps({
    "torch_isa": torch.backends.cpu.get_cpu_capability(),
    "fast_bf16": cpu_has_fast_bf16(),
    "dtype": str(llm.engine.dtype),
    "int4_rows": llm.engine.runner.model.int4_rows(),
    "int8_rows": llm.engine.runner.model.int8_rows(),
    "q4_int8_layers": llm.engine.runner.model.q4_int8_layers(),
    "cpu_kernels": llm.engine.runner.model.decoder_layers[0].kernels is not None,
    "answers": answers(llm),
}))
"""


@pytest.mark.slow
def test_forced_avx2_choices_give_the_fp32_answers(default_llm_fp32, tmp_path):
    """An AVX512 machine run as an AVX2 one (torch's and oneDNN's ISA caps) chooses what an
    AVX2 CPU gets by default (float32, the Q4 GGUF's matmuls on the Q4 x int8 kernel and the
    LM head on its Q8 sibling where a compiler builds them, no bfloat16 4-bit path), the caps
    take effect, and its answers are the exact float32 reference's. On an AVX2-only CPU this
    is the plain default path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, **AVX2_KERNEL_CAPS, "TESTS_DIR": str(Path(__file__).parent), "ONEDNN_VERBOSE": "1"}
    run = subprocess.run([sys.executable, "-c", AVX2_PROBE], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe["torch_isa"] == "AVX2" and not probe["fast_bf16"]
    assert "isa:Intel AVX2" in run.stdout + run.stderr  # oneDNN's own report of its ISA
    assert probe["dtype"] == "torch.float32" and probe["int4_rows"] == 0
    built = shutil.which("cc") is not None
    # the LM head on the Q8 x int8 kernel where it builds, else on int8 for 1-2-row steps
    assert probe["int8_rows"] == (0 if built else 2)
    assert default_llm_fp32.engine.runner.model.int8_rows() == 0
    assert probe["cpu_kernels"] == built  # built for AVX2 there
    assert probe["q4_int8_layers"] == (120 if built else 0)  # 30 layers x 4
    reference = answers(default_llm_fp32)
    for answer in probe["answers"]:
        assert answer["emotion"] in LABELS and isinstance(answer["learn_score"], bool)
    assert sum(a == b for a, b in zip(reference, probe["answers"])) >= MIN_AGREEMENT
