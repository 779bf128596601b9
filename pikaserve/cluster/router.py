"""Which replica takes a request, on Ray Serve's request-router API.

prefix: the replica thought to hold the longest cached prefix of the prompt (PrefixIndex, fed
with the block hashes of every prompt routed), unless it has more than `imbalance_threshold`
requests in flight above the least loaded replica: then, and when no replica holds any of the
prompt, the least loaded one. A shared system prompt so stays on the replica that computed it
until load says otherwise, and different prompts spread.
pow2: the less loaded of two replicas drawn at random. round-robin: replicas in turn.

Loads are the requests this router has in flight on each replica (every request goes through
the one HTTP server, so that is all of them). Ranks go back to Ray Serve, which takes the
first replica of the first rank that has room (max_ongoing_requests).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pikaserve.cluster.prefix_index import PrefixIndex
from pikaserve.kv.block_pool import extend_hashes

ROUTED_METHOD = "generate"  # the replica method whose calls carry a prompt


class ReplicaRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix", block_size: int = 4,
                         imbalance_threshold: int = 8, index_blocks: int = 1 << 20,
                         **_: Any) -> None:
        self.policy = policy
        self.block_size = block_size
        self.imbalance_threshold = imbalance_threshold
        self.index = PrefixIndex(index_blocks)
        self.in_flight: defaultdict[ReplicaID, int] = defaultdict(int)
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        # least loaded first; among equals, the one holding least, so that new prefixes spread
        by_load = sorted(candidate_replicas, key=lambda r: (
            self.in_flight[r.replica_id], self.index.num_blocks(r.replica_id),
            r.replica_id.unique_id))
        if not by_load:
            return []
        if self.policy == "pow2":
            two = random.sample(by_load, min(2, len(by_load)))
            return [sorted(two, key=by_load.index)]
        if self.policy == "round-robin":
            self._turn += 1
            first = sorted(by_load, key=lambda r: r.replica_id.unique_id)[self._turn % len(by_load)]
        else:
            first = self._by_prefix(by_load, self._prompt_blocks(pending_request))
        return [[first], [r for r in by_load if r is not first]]

    def _by_prefix(self, by_load: list[RunningReplica], hashes: list[int]) -> RunningReplica:
        """The replica holding the longest prefix of these blocks, unless it is overloaded;
        else the least loaded."""
        least = by_load[0]
        best = max(by_load, key=lambda r: self.index.matched_blocks(r.replica_id, hashes))
        excess = self.in_flight[best.replica_id] - self.in_flight[least.replica_id]
        if self.index.matched_blocks(best.replica_id, hashes) and excess <= self.imbalance_threshold:
            return best
        return least

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        self.in_flight[replica_id] += 1
        hashes = self._prompt_blocks(pending_request)
        if hashes:
            self.index.record(replica_id, hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight[replica_id] = max(0, self.in_flight[replica_id] - 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        self.index.retain(live)
        for gone in [r for r in self.in_flight if r not in live]:
            del self.in_flight[gone]

    def _prompt_blocks(self, pending_request: PendingRequest | None) -> list[int]:
        """The chained hashes of the prompt's full blocks (as the replicas' prefix caches
        compute them); [] for calls that carry no prompt. Computed when choosing and again
        when recording (tens of us for a Pika prompt), so that no per-request state is left
        behind by a request cancelled before it was routed."""
        if (self.policy != "prefix" or pending_request is None
                or pending_request.metadata.call_method != ROUTED_METHOD):
            return []
        _, token_ids, params = pending_request.args
        hashes: list[int] = []
        extend_hashes(hashes, token_ids, len(token_ids) // self.block_size, self.block_size,
                      params.cache_salt)
        return hashes
