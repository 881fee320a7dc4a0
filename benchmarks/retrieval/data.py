"""Synthetic long-context retrieval data (RULER-style needle-in-a-haystack, multi-key).

Token layout (``DataConfig``, vocabulary of 256 by default)::

    specials      PAD=0 BOS=1 NEEDLE=2 ARROW=3 (reserved, unused) END=4 QUERY=5
    distractor    [dist_lo, dist_lo + n_dist)    "text": a fixed Markov chain (a random walk on a
                                                  ring of n_dist states, read through a fixed
                                                  permutation), so it has local structure
    key tokens    [key_lo, key_lo + n_key)        keys are key_len of them
    value tokens  [val_lo, val_lo + n_val)        values are value_len of them

A needle is ``NEEDLE k1..kK v1..vV END`` written over the haystack at some depth. A prompt ends
with ``QUERY k1..kK`` and the answer is ``v1..vV`` of the needle with that key (the other needles
are distractors with other keys; the last key token differs between the needles of a haystack, so
the question is answered by finding the earlier occurrence of the key and copying what follows).
Everything is a pure function of a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["DataConfig", "markov_text", "train_batch", "answer_positions", "eval_examples",
           "PAD", "BOS", "NEEDLE", "ARROW", "END", "QUERY"]

PAD, BOS, NEEDLE, ARROW, END, QUERY = 0, 1, 2, 3, 4, 5
_CHAIN_SEED = 20260101  # fixes the distractor chain (its permutation), not the samples
# Random-walk steps on the ring, drawn uniformly from this table (so +1 is most likely).
_STEPS = (1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, -1, -1, 5, 11, -7)


@dataclass(frozen=True)
class DataConfig:
    vocab_size: int = 256
    dist_lo: int = 8
    n_dist: int = 128
    key_lo: int = 136
    n_key: int = 64
    val_lo: int = 200
    n_val: int = 56
    key_len: int = 2
    value_len: int = 4

    def __post_init__(self) -> None:
        ranges = sorted([(self.dist_lo, self.n_dist), (self.key_lo, self.n_key), (self.val_lo, self.n_val)])
        if ranges[0][0] <= QUERY:
            raise ValueError("token ranges must start after the special tokens (ids 0..5)")
        for (a, n), (b, _) in zip(ranges, ranges[1:]):
            if a + n > b:
                raise ValueError(f"DataConfig token ranges overlap: {ranges}")
        if ranges[-1][0] + ranges[-1][1] > self.vocab_size:
            raise ValueError(f"DataConfig token ranges exceed vocab_size={self.vocab_size}: {ranges}")
        if self.key_len < 1 or self.value_len < 1:
            raise ValueError("key_len and value_len must be >= 1")

    @property
    def needle_len(self) -> int:
        return 2 + self.key_len + self.value_len

    @property
    def query_len(self) -> int:
        """Tokens of the question at the end of a prompt (QUERY key)."""
        return 1 + self.key_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> DataConfig:
        return cls() if d is None else cls(**d)


def _chain_perm(cfg: DataConfig, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(_CHAIN_SEED)
    return (torch.randperm(cfg.n_dist, generator=g) + cfg.dist_lo).to(device)


def markov_text(cfg: DataConfig, B: int, L: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """int64 (B, L) distractor tokens: a random walk on a ring read through a fixed permutation."""
    device = generator.device if device is None else device
    steps = torch.tensor(_STEPS, device=device)[
        torch.randint(0, len(_STEPS), (B, L), generator=generator, device=device)
    ]
    start = torch.randint(0, cfg.n_dist, (B, 1), generator=generator, device=device)
    state = (start + torch.cumsum(steps, 1)) % cfg.n_dist
    return _chain_perm(cfg, device)[state]


def _random_keys(cfg: DataConfig, B: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, n, key_len) keys whose last tokens are distinct within each row."""
    if n > cfg.n_key:
        raise ValueError(f"at most n_key={cfg.n_key} needles per haystack, got {n}")
    last = torch.rand(B, cfg.n_key, generator=generator, device=device).argsort(-1)[:, :n]
    lead = torch.randint(0, cfg.n_key, (B, n, cfg.key_len - 1), generator=generator, device=device)
    return torch.cat((lead, last[..., None]), -1) + cfg.key_lo


def _needle_tokens(cfg: DataConfig, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    lead = keys.new_full(keys.shape[:-1] + (1,), NEEDLE)
    end = keys.new_full(keys.shape[:-1] + (1,), END)
    return torch.cat((lead, keys, vals, end), -1)


def train_batch(
    cfg: DataConfig,
    B: int,
    L: int,
    n_needles: int,
    n_queries: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on ``generator``'s device: ids (B, L) and targets (B, L) (-100 = no loss).

    Layout: BOS, haystack with ``n_needles`` needles (one per equal segment, at a random offset),
    then ``n_queries`` questions ``QUERY key value END`` about random needles; the loss is on the
    value tokens only.
    """
    dev = generator.device
    nl, ql, V = cfg.needle_len, cfg.query_len, cfg.value_len
    tail = n_queries * (ql + V + 1)
    ctx = L - tail  # BOS + haystack
    seg = (ctx - 1) // n_needles
    if seg < nl:
        raise ValueError(f"L={L} is too short for {n_needles} needles and {n_queries} queries")
    ids = markov_text(cfg, B, L, generator)
    ids[:, 0] = BOS
    keys = _random_keys(cfg, B, n_needles, generator, dev)
    vals = torch.randint(0, cfg.n_val, (B, n_needles, V), generator=generator, device=dev) + cfg.val_lo
    offs = torch.randint(0, seg - nl + 1, (B, n_needles), generator=generator, device=dev)
    pos = 1 + torch.arange(n_needles, device=dev) * seg + offs  # (B, n)
    idx = (pos[..., None] + torch.arange(nl, device=dev)).flatten(1)
    ids.scatter_(1, idx, _needle_tokens(cfg, keys, vals).flatten(1))
    pick = torch.randint(0, n_needles, (B, n_queries), generator=generator, device=dev)
    qk = torch.gather(keys, 1, pick[..., None].expand(-1, -1, cfg.key_len))
    qv = torch.gather(vals, 1, pick[..., None].expand(-1, -1, V))
    q_lead = qk.new_full((B, n_queries, 1), QUERY)
    q_end = qk.new_full((B, n_queries, 1), END)
    ids[:, ctx:] = torch.cat((q_lead, qk, qv, q_end), -1).flatten(1)
    targets = torch.full_like(ids, -100)
    pos = answer_positions(cfg, L, n_queries, dev)
    targets[:, pos] = ids[:, pos + 1]
    return ids, targets


def answer_positions(cfg: DataConfig, L: int, n_queries: int, device=None) -> torch.Tensor:
    """int64 positions of a :func:`train_batch` row whose next token is an answer (value) token."""
    per = cfg.query_len + cfg.value_len + 1
    ctx = L - n_queries * per
    pos = ctx + torch.arange(n_queries, device=device)[:, None] * per + cfg.query_len - 1
    return (pos + torch.arange(cfg.value_len, device=device)).flatten()


def eval_examples(
    cfg: DataConfig, length: int, depth: float, n_needles: int, n_samples: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation prompts (n_samples, length) and answers (n_samples, value_len), on the CPU.

    The queried needle starts at ``depth`` (0 = right after BOS, 1 = right before the question) of
    the haystack; the other ``n_needles - 1`` needles (other keys) sit at random free places. A
    pure function of (cfg, length, depth, n_needles, n_samples, seed).
    """
    if not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    nl, ql = cfg.needle_len, cfg.query_len
    ctx = length - ql
    if ctx - 1 < n_needles * nl * 2:
        raise ValueError(f"length={length} is too short for {n_needles} needles")
    sub = int(round(depth * 1000))
    g = torch.Generator().manual_seed(hash_seed(seed, length, sub, n_needles))
    ids = markov_text(cfg, n_samples, length, g, device="cpu")
    ids[:, 0] = BOS
    keys = _random_keys(cfg, n_samples, n_needles, g, "cpu")
    vals = torch.randint(0, cfg.n_val, (n_samples, n_needles, cfg.value_len), generator=g) + cfg.val_lo
    needles = _needle_tokens(cfg, keys, vals)
    span = ctx - 1 - nl  # needle start in [1, 1 + span]
    for s in range(n_samples):
        starts = [1 + int(round(depth * span))]
        while len(starts) < n_needles:
            p = 1 + int(torch.randint(0, span + 1, (1,), generator=g))
            if all(abs(p - q) >= nl for q in starts):
                starts.append(p)
        for j, p in enumerate(starts):
            ids[s, p : p + nl] = needles[s, j]
    ids[:, ctx] = QUERY
    ids[:, ctx + 1 : ctx + 1 + cfg.key_len] = keys[:, 0]
    return ids, vals[:, 0].clone()


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints is stable, but be explicit)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
