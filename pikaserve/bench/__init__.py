"""pikaserve.bench: the load generator behind `pikaserve bench` (see docs/bench.md).

workloads -> what to send; schedule -> when; client -> one streamed request; runner -> the load
loop and --compare interleaving; stats -> metric math; report/plots -> tables, JSON, CSV, PNG.
"""
