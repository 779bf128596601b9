"""The replica router's choices and its prefix index, without a Ray instance: replicas and
requests are stand-ins with the attributes Ray Serve's router API reads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from pikaserve.cluster.client import sum_stats
from pikaserve.cluster.prefix_index import PrefixIndex
from pikaserve.cluster.router import ReplicaRouter
from pikaserve.engine.outputs import EngineStats
from pikaserve.engine.sampling_params import SamplingParams

BLOCK = 4


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass
class FakeReplica:
    replica_id: FakeId = field(default_factory=lambda: FakeId("?"))


def replicas(*names: str) -> list[FakeReplica]:
    return [FakeReplica(FakeId(n)) for n in names]


def request(tokens: list[int], n: int = 0, salt: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        args=(f"req-{n}", tokens, SamplingParams(max_tokens=1, cache_salt=salt)),
        metadata=SimpleNamespace(call_method="generate", internal_request_id=f"internal-{n}"))


def router(policy: str = "prefix", threshold: int = 8) -> ReplicaRouter:
    r = ReplicaRouter.__new__(ReplicaRouter)  # the policy alone; Ray's machinery is not needed
    r.initialize_state(policy=policy, block_size=BLOCK, imbalance_threshold=threshold)
    return r


def first_choice(r: ReplicaRouter, candidates, pending) -> str:
    ranks = asyncio.run(r.choose_replicas(candidates, pending))
    assert sorted(x.replica_id.unique_id for rank in ranks for x in rank) == \
        sorted(c.replica_id.unique_id for c in candidates)  # every replica ranked once
    return ranks[0][0].replica_id.unique_id


def route(r: ReplicaRouter, candidates, pending, finish: bool = True) -> str:
    chosen = first_choice(r, candidates, pending)
    replica_id = next(c.replica_id for c in candidates if c.replica_id.unique_id == chosen)
    r.on_request_routed(pending, replica_id, None)
    if finish:
        r.on_request_completed(replica_id, pending.metadata.internal_request_id)
    return chosen


SYSTEM_A = [7] * 40
SYSTEM_B = [9] * 40


def test_a_shared_prefix_follows_the_replica_that_has_it_and_new_ones_spread():
    r, reps = router(), replicas("a", "b")
    home = route(r, reps, request(SYSTEM_A + [1, 2, 3], 0))
    assert all(route(r, reps, request(SYSTEM_A + [i, i], i)) == home for i in range(1, 6))
    other = route(r, reps, request(SYSTEM_B + [1], 10))
    assert other != home  # nothing cached anywhere: the replica holding less
    assert route(r, reps, request(SYSTEM_B + [5, 5], 11)) == other


def test_the_cache_salt_separates_prefixes():
    r, reps = router(), replicas("a", "b")
    home = route(r, reps, request(SYSTEM_A + [1], 0))
    assert route(r, reps, request(SYSTEM_A + [2], 1, salt="tenant-2")) != home


def test_an_overloaded_replica_loses_its_affinity_traffic():
    r, reps = router(threshold=2), replicas("a", "b")
    home = route(r, reps, request(SYSTEM_A + [1], 0))
    for i in range(1, 3):  # two more in flight there: at the threshold, still affine
        assert route(r, reps, request(SYSTEM_A + [i], i), finish=False) == home
    assert route(r, reps, request(SYSTEM_A + [9], 9), finish=False) == home  # 3 - 0 > 2 next
    assert first_choice(r, reps, request(SYSTEM_A + [10], 10)) != home


def test_round_robin_takes_replicas_in_turn():
    r, reps = router("round-robin"), replicas("a", "b", "c")
    chosen = [route(r, reps, request(SYSTEM_A, i)) for i in range(6)]
    assert sorted(chosen[:3]) == ["a", "b", "c"] and chosen[3:] == chosen[:3]


def test_pow2_ranks_two_replicas_less_loaded_first():
    r, reps = router("pow2"), replicas("a", "b", "c", "d")
    busy = reps[0].replica_id
    for i in range(5):
        r.on_request_routed(request(SYSTEM_A, i), busy, None)
    pairs = set()
    for i in range(40):
        ranks = asyncio.run(r.choose_replicas(reps, request(SYSTEM_A, 100 + i)))
        assert len(ranks) == 1 and len(ranks[0]) == 2
        assert ranks[0][0].replica_id != busy  # drawn or not, the busy one never comes first
        pairs.add(frozenset(x.replica_id.unique_id for x in ranks[0]))
    assert len(pairs) > 1  # drawn at random


def test_calls_without_a_prompt_go_to_the_least_loaded():
    r, reps = router(), replicas("a", "b")
    r.on_request_routed(request(SYSTEM_A, 0), reps[0].replica_id, None)
    pending = SimpleNamespace(args=(), metadata=SimpleNamespace(call_method="describe",
                                                               internal_request_id="d"))
    assert first_choice(r, reps, pending) == "b"


def test_the_prefix_index_matches_leading_blocks_and_forgets_lru():
    index = PrefixIndex(capacity_blocks=3)
    index.record("a", [1, 2, 3])
    assert index.matched_blocks("a", [1, 2, 9, 3]) == 2
    assert index.matched_blocks("b", [1]) == 0
    index.record("a", [4])  # over capacity: block 1, least recently recorded, goes
    assert index.matched_blocks("a", [1]) == 0 and index.num_blocks("a") == 3
    index.retain(["b"])
    assert index.num_blocks("a") == 0


def test_replica_stats_sum_counters_and_average_kv_usage():
    a = EngineStats(1, 2, 0.5, 100, 40, 7, kv_offload_restored=3,
                    spec_decode_num_accepted_tokens_per_pos=(4, 1))
    b = EngineStats(0, 1, 0.25, 50, 10, 3, spec_decode_num_accepted_tokens_per_pos=(2,))
    total = sum_stats([a, b])
    assert (total.num_running, total.num_waiting, total.prefix_cache_queries,
            total.prefix_cache_hits, total.num_forward_passes) == (1, 3, 150, 50, 10)
    assert total.kv_usage == 0.375 and total.kv_offload_restored == 3
    assert total.spec_decode_num_accepted_tokens_per_pos == (6, 1)


@pytest.mark.parametrize("device,gpus,replicas,address,want", [
    ("cpu", 4, 2, None, 0),
    ("auto", 0, 2, None, 0),  # no CUDA here: CPU replicas
    ("auto", 2, 2, None, 1),
    ("cuda", 4, 2, None, 1),
    ("cuda", 0, 4, "10.0.0.5:6379", 1),  # a joined cluster's GPUs are its own to count
    ("cuda", 1, 2, None, "replicas do not share a GPU yet"),
    ("cuda:1", 4, 2, None, "CUDA_VISIBLE_DEVICES"),
])
def test_each_replica_asks_ray_for_a_gpu_of_its_own(device, gpus, replicas, address, want,
                                                    monkeypatch):
    import torch

    from pikaserve.cluster.launch import replica_gpus
    from pikaserve.config import ConfigError, EngineConfig, ServerConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    args = (EngineConfig(device=device), ServerConfig(replicas=replicas, ray_address=address))
    if isinstance(want, str):
        with pytest.raises(ConfigError, match=want):
            replica_gpus(*args)
    else:
        assert replica_gpus(*args) == want
