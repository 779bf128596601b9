"""A request's grammar state: the engine's Constraint (engine/constraint.py) over llguidance.

Forced tokens come from one function of the grammar state, `_ensure_plan`, used by both modes:
- fast-forward on: the engine appends the whole plan after a sampled token (no sampling);
- fast-forward off: the mask allows exactly the plan's next token, so token-by-token decoding
  takes the very same tokens, one forward pass each.
So the two modes produce identical tokens by construction (docs/structured_output.md).

A plan is built from:
1. llguidance's fast-forward tokens (`compute_ff_tokens`): the canonical tokenization of the
   bytes the grammar forces next (llguidance's own mask allows only the first of them too);
2. canonical forcing: when few tokens are allowed (e.g. inside an enum), each is checked against
   the tokenizer: is it how the tokenizer itself would split this text, given the bytes the
   grammar forces after it? If exactly one allowed token passes, it is forced ("th" must be
   followed by "ats" in `thats_right`, since the tokenizer writes "thinking" as one token). If
   several pass, the mask keeps only those; if none pass, the grammar's mask is used unchanged.
   Not applied where end-of-sequence is allowed, so an answer is never cut short by it.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch
from llguidance import LLMatcher

from pikaserve.engine.constraint import Draft
from pikaserve.structured.tokenizer_info import TokenizerInfo

logger = logging.getLogger(__name__)

MAX_DRAFT_CANDIDATES = 8  # drafts are guessed only among this few allowed tokens
MAX_CANONICAL_CANDIDATES = 64  # canonical checks only where few tokens are allowed (~3 us each)
CONTEXT_TOKENS = 3  # tokens of context for a canonical check
MAX_PLAN = 256  # forced tokens computed at once (a plan continues after it is consumed)
MAX_CACHED_HISTORY = 256  # states deeper than this many tokens are not cached
NEG_INF = float("-inf")


class _Mask:
    """Allowed tokens at one grammar state: a short id list, or a forbidden-token bitmap.

    CPU rows are masked through numpy (single-threaded): a torch op on one 49k row is a few
    microseconds, but it wakes the intra-op thread pool, which costs milliseconds when another
    process holds a core. Other devices get torch tensors, moved once per state.
    """

    __slots__ = ("ids", "forbidden", "_on")

    def __init__(self, ids: list[int] | None = None, forbidden: np.ndarray | None = None) -> None:
        self.ids = np.asarray(ids, dtype=np.int64) if ids is not None else None  # sorted
        self.forbidden = forbidden
        self._on: tuple[torch.device, torch.Tensor] | None = None

    def apply(self, row: torch.Tensor) -> None:
        n = row.shape[0]
        if self.ids is not None:
            ids = self.ids
            if len(ids) and ids[-1] >= n:  # the model's vocabulary is smaller than the tokenizer's
                ids = ids[ids < n]
            if _numpy_ok(row):
                a = row.numpy()
                keep = a[ids]
                a.fill(NEG_INF)
                a[ids] = keep
                return
            t = self._tensor(ids, row.device)
            kept = row.index_select(0, t)
            row.fill_(NEG_INF)
            row.index_copy_(0, t, kept)
            return
        forbidden = self._forbidden_bits
        m = min(n, len(forbidden))
        if _numpy_ok(row):
            a = row.numpy()
            a[:m][forbidden[:m]] = NEG_INF
        else:
            row[:m].masked_fill_(self._tensor(forbidden[:m], row.device), NEG_INF)
        if n > m:  # model rows past the tokenizer's vocabulary (padding)
            row[m:] = NEG_INF

    def allow_bits(self, row: np.ndarray) -> None:
        """Sets the bits of the allowed tokens in `row`, a packed bitmask (uint8, bit t % 8 of
        byte t // 8 for token t, little-endian bit order); leaves the others as they are."""
        if self.ids is not None:
            ids = self.ids[self.ids < row.shape[0] * 8]
            np.bitwise_or.at(row, ids >> 3, (1 << (ids & 7)).astype(np.uint8))
            return
        packed = np.packbits(~self._forbidden_bits, bitorder="little")
        row[: len(packed)] |= packed[: row.shape[0]]

    @property
    def _forbidden_bits(self) -> np.ndarray:
        """`forbidden`, for a mask built without `ids`."""
        if self.forbidden is None:
            raise ValueError("a mask needs ids or forbidden")
        return self.forbidden

    def _tensor(self, a: np.ndarray, device: torch.device) -> torch.Tensor:
        if self._on is None or self._on[0] != device or self._on[1].shape[0] != len(a):
            self._on = (device, torch.from_numpy(np.ascontiguousarray(a)).to(device))
        return self._on[1]


def _few_ids(raw: np.ndarray, vocab_size: int) -> list[int] | None:
    """The allowed token ids of a packed bitmask when there are at most
    MAX_CANONICAL_CANDIDATES of them, else None; reads only the non-zero bytes."""
    nonzero = np.flatnonzero(raw)
    if len(nonzero) > MAX_CANONICAL_CANDIDATES:
        return None
    bits = np.unpackbits(raw[nonzero], bitorder="little").reshape(-1, 8).astype(bool)
    ids = (nonzero[:, None] * 8 + np.arange(8))[bits]
    if len(ids) > MAX_CANONICAL_CANDIDATES:
        return None
    return ids[ids < vocab_size].tolist()


def _numpy_ok(row: torch.Tensor) -> bool:
    return row.device.type == "cpu" and row.dtype in (torch.float32, torch.float64, torch.float16)


class ExploreCache:
    """What `_explore` found, and the draft, at each grammar state of one compiled grammar,
    shared by its requests. A state is a pure function of the tokens consumed so far, so the
    token history is the key: a repeated schema (Pika) finds its masks, canonical checks and
    drafts here."""

    __slots__ = ("entries", "drafts", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self.entries: dict[tuple[int, ...], tuple[int | None, _Mask | None]] = {}
        self.drafts: dict[tuple[int, ...], Draft | None] = {}
        self.limit = limit

    @staticmethod
    def key(history: list[int]) -> tuple[int, ...] | None:
        return tuple(history) if len(history) <= MAX_CACHED_HISTORY else None

    def store(self, table: dict, key: tuple[int, ...] | None, value) -> None:
        if key is not None:
            if len(table) >= self.limit:
                table.clear()
            table[key] = value


class GrammarMatcher:
    """Implements the Constraint protocol for one request; used only by the engine thread."""

    def __init__(
        self, matcher: LLMatcher, info: TokenizerInfo, cache: ExploreCache | None = None
    ) -> None:
        self._m = matcher  # has consumed every accepted token, then every token of _plan
        self._info = info
        self._cache = cache if cache is not None else ExploreCache()
        self._eos = frozenset(info.eos_token_ids)
        self._plan: deque[int] = deque()  # forced next, not yet accepted by the engine
        self._planned = False  # _plan (and _mask, its end state's mask) are up to date
        self._mask: _Mask | None = None
        self._consumed: list[int] = []  # every token the matcher consumed (accepted + plan)
        self.error: str | None = None  # why the grammar could not go on, if it could not

    # --- Constraint protocol ------------------------------------------------------------
    def mask_logits(self, logits: torch.Tensor) -> None:
        plan = self._ensure_plan()
        if plan:
            _keep_ids(logits, [plan[0]])
        elif self.error is not None or self._mask is None:
            _keep_ids(logits, self._info.eos_token_ids)  # finished or failed: end the answer
        else:
            self._mask.apply(logits)

    def allow_bits(self, row: np.ndarray) -> None:
        plan = self._ensure_plan()
        if plan:
            _Mask(ids=[plan[0]]).allow_bits(row)
        elif self.error is not None or self._mask is None:
            _Mask(ids=sorted(self._info.eos_token_ids)).allow_bits(row)
        else:
            self._mask.allow_bits(row)

    def allowed_tokens(self) -> list[int] | None:
        plan = self._ensure_plan()
        return [plan[0]] if plan else self._allowed_after_plan()

    def accept(self, token_ids: list[int]) -> None:
        for t in token_ids:
            if self.error is not None:
                return
            if self._plan:
                if self._plan[0] == t:
                    self._plan.popleft()  # already consumed by the matcher
                    continue
                self._m.rollback(len(self._plan))  # not the forced token: drop the plan
                del self._consumed[-len(self._plan):]
                self._plan.clear()
            self._planned, self._mask = False, None
            if not self._m.consume_token(t):
                self._fail(f"token {t} is not allowed by the grammar")
                return
            self._consumed.append(t)

    def forced_tokens(self) -> list[int]:
        return list(self._ensure_plan())

    @property
    def is_finished(self) -> bool:
        return self.error is not None or (not self._plan and self._m.is_stopped())

    def draft(self) -> Draft | None:
        """At a choice among a few tokens, guesses the one whose forced tail is shortest but not
        empty and does not end the answer: in an enum, the label ending here ("happy", not
        "happy_2"), which is the common case. Free text and numbers get no draft."""
        if self._ensure_plan() or self.error is not None or self._mask is None:
            return None
        ids = self._mask.ids
        if ids is None or len(ids) > MAX_DRAFT_CANDIDATES:
            return None
        cache = self._cache
        key = cache.key(self._consumed)
        if key in cache.drafts:
            return cache.drafts[key]
        best: Draft | None = None
        for t in ids.tolist():
            if t in self._eos or self._info.is_special(t):
                continue
            guess = self._what_if(t)
            if guess is not None and (best is None or len(guess.token_ids) < len(best.token_ids)):
                best = guess
        cache.store(cache.drafts, key, best)
        return best

    # --- internals ----------------------------------------------------------------------
    def _what_if(self, token: int) -> Draft | None:
        """The draft starting with `token`, if it has a forced tail and leaves a choice after
        it. Explored on a copy of the llguidance matcher; every field is restored after."""
        saved = (self._m, self._planned, self._mask, len(self._consumed), self.error)
        self._m = self._m.deep_copy()
        try:
            self.accept([token])
            tail = list(self._ensure_plan())
            if tail and self._planned and not self._m.is_stopped() and self.error is None:
                return Draft([token, *tail], self._allowed_after_plan())
            return None
        finally:
            self._m, self._planned, self._mask, num_consumed, self.error = saved
            del self._consumed[num_consumed:]
            self._plan.clear()

    def _allowed_after_plan(self) -> list[int] | None:
        if self.error is not None or self._mask is None:
            return list(self._info.eos_token_ids)
        return None if self._mask.ids is None else self._mask.ids.tolist()

    def _fail(self, why: str) -> None:
        detail = self._m.get_error().split("\n", 1)[0]
        self.error = f"{why}: {detail}" if detail else why
        self._plan.clear()
        logger.warning("structured output stopped early: %s", self.error)

    def _ensure_plan(self) -> deque[int]:
        if self._planned or self.error is not None:
            return self._plan
        m, plan = self._m, self._plan
        while not m.is_stopped() and len(plan) < MAX_PLAN:
            forced = m.compute_ff_tokens()
            if not forced:
                token = self._explore_cached()
                if token is None:
                    break
                forced = [token]
            if not m.consume_tokens(forced):
                self._fail("forced tokens were rejected")
                return plan
            plan.extend(forced)
            self._consumed.extend(forced)
        # At MAX_PLAN the plan is left open: it goes on from its end state next time.
        self._planned = m.is_stopped() or len(plan) < MAX_PLAN
        return plan

    def _explore_cached(self) -> int | None:
        cache = self._cache
        key = cache.key(self._consumed)
        hit = cache.entries.get(key) if key is not None else None
        if hit is None:
            hit = (self._explore(), self._mask)
            if self.error is None:
                cache.store(cache.entries, key, hit)
        token, self._mask = hit
        return token

    def _explore(self) -> int | None:
        """Computes the mask at the matcher's state; returns the token to force, if one is."""
        self._mask = None
        info = self._info
        raw = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        ids = _few_ids(raw, info.vocab_size)
        if ids is None:  # many tokens allowed (free text, numbers): a bitmap, no checks
            bits = np.unpackbits(raw, bitorder="little")[: info.vocab_size]
            self._mask = _Mask(forbidden=bits == 0)
            return None
        if not ids:  # a dead end the grammar did not report: only end-of-sequence
            self._mask = _Mask(ids=sorted(info.eos_token_ids))
            return None
        allowed = ids
        if not self._eos.intersection(allowed):
            if len(allowed) == 1:
                return allowed[0]
            canonical = self._canonical(allowed)
            if len(canonical) == 1:
                return canonical[0]
            allowed = canonical or allowed
        self._mask = _Mask(ids=allowed)
        return None

    def _context(self) -> tuple[int, ...]:
        context = self._consumed[-CONTEXT_TOKENS:]
        while context and any(self._info.is_special(t) for t in context):
            context = context[1:]
        return tuple(context)

    def _canonical(self, candidates: list[int]) -> list[int]:
        """The candidates the tokenizer could itself have produced here (see module doc)."""
        info, m = self._info, self._m
        ctx = self._context()
        out = []
        for t in candidates:
            if info.is_special(t):
                out.append(t)
                continue
            if not m.consume_token(t):  # cannot happen for a masked-in token; be safe
                self._fail("the grammar's mask and matcher disagree")
                return []
            forced = m.compute_ff_bytes()
            ok = info.is_canonical(ctx, t, forced)
            if ok and not forced and not m.is_accepting():
                # Nothing is forced after t: look one token further. "c" passes alone, but no
                # label goes on canonically after it ("calm" is "cal"+"m", "curious" "cur"+...).
                ok = self._goes_on_canonically((*ctx, t)[-CONTEXT_TOKENS:])
                if self.error is not None:
                    return []
            m.rollback(1)
            if ok:
                out.append(t)
        return out

    def _goes_on_canonically(self, ctx: tuple[int, ...]) -> bool:
        info, m = self._info, self._m
        ids = _few_ids(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), info.vocab_size)
        if not ids:  # many continuations (cannot tell), or a dead end (let the grammar say)
            return True
        for t in ids:
            if t in self._eos or info.is_special(t):
                return True
            if not m.consume_token(t):
                self._fail("the grammar's mask and matcher disagree")
                return True
            forced = m.compute_ff_bytes()
            m.rollback(1)
            if info.is_canonical(ctx, t, forced):
                return True
        return False


def _keep_ids(row: torch.Tensor, ids: list[int]) -> None:
    _Mask(ids=sorted(ids)).apply(row)
