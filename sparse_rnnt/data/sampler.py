"""Duration-bucketed batch sampler under a padded-frame budget; resumable and rank-sharded.

One epoch's batches are a pure function of (durations, languages, config, epoch):

1. Group utterances: one group per language (``monolingual``) or a single group (``mixed``).
2. Within a group, order by duration bucket (``floor(duration / bucket_width_s)``). With
   ``shuffle`` the order inside a bucket is random per (seed, epoch), so batch compositions change
   between epochs while lengths stay within about one bucket width; without it, by duration.
3. Pack greedily in that order: an utterance joins the current batch while
   ``len(batch) * max_frames_in_batch <= max_frames`` and ``len(batch) <= max_batch``. An
   utterance over the budget on its own forms a batch alone (counted in ``oversized``).
   ``drop_last`` drops each group's final batch when it is left over: not full (it could take
   another utterance as long as its longest) and not the group's only batch (a language whose
   data fit in one partial batch keeps it rather than vanish from training).
4. Order the batches. ``order="shuffled"``: shuffle the batches of all groups together
   (``shuffle``), from (seed, epoch), so each language gets steps in proportion to its data.
   ``order="round-robin"`` (monolingual only): the languages take turns in sorted order, one batch
   each (with ``shuffle``, each language's batches in a random order per (seed, epoch)); a language
   whose batches run out drops out of the cycle.
5. Shard: with ``world_size`` ranks the list is truncated to a multiple of ``world_size`` and rank
   ``r`` takes batches ``r::world_size``, so every rank runs the same number of steps. In
   ``monolingual`` mode the ranks' batches at one step may then be of different languages; the
   trainer does not shard here (each rank takes its part of every global batch,
   ``training.distributed``), so one step trains one language on every rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

MODES: tuple[str, ...] = ("mixed", "monolingual")
ORDERS: tuple[str, ...] = ("shuffled", "round-robin")


@dataclass(frozen=True)
class BatchConfig:
    """Batching settings; frames are feature frames (``frames_per_second`` of the sampler)."""

    max_frames: int = 20000  # padded frames per batch: len(batch) * longest utterance's frames
    max_batch: int = 64
    bucket_width_s: float = 1.0
    mode: str = "mixed"  # mixed | monolingual
    order: str = "shuffled"  # shuffled | round-robin (monolingual: languages take turns)
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False

    def validate(self) -> None:
        if self.max_frames <= 0 or self.max_batch <= 0:
            raise UserError(
                f"batch config: max_frames and max_batch must be positive "
                f"(got {self.max_frames}, {self.max_batch})"
            )
        if not self.bucket_width_s > 0.0:
            raise UserError(
                f"batch config: bucket_width_s must be positive, got {self.bucket_width_s}"
            )
        if self.mode not in MODES:
            raise UserError(f"batch config: mode {self.mode!r}, choose from {', '.join(MODES)}")
        if self.order not in ORDERS:
            raise UserError(f"batch config: order {self.order!r}, choose from {', '.join(ORDERS)}")
        if self.order == "round-robin" and self.mode != "monolingual":
            raise UserError("batch config: order round-robin takes turns between languages: it needs mode monolingual")


def duration_to_frames(duration: float, frames_per_second: float) -> int:
    """Feature frames of an utterance: ``1 + floor(duration * fps)`` (centred STFT convention)."""
    # The epsilon absorbs decimal round-off such as 2.9999999 for a 3 s manifest duration.
    return 1 + math.floor(duration * frames_per_second + 1e-6)


class BucketBatchSampler:
    """Yields lists of dataset indices; see the module docstring for the batching rules."""

    def __init__(
        self,
        durations: Sequence[float],
        languages: Sequence[str],
        config: BatchConfig,
        frames_per_second: float = 100.0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``durations`` in seconds and ``languages`` (ISO codes), one per dataset index."""
        config.validate()
        if len(durations) != len(languages):
            raise ValueError(f"{len(durations)} durations but {len(languages)} languages")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if frames_per_second <= 0:
            raise ValueError(f"frames_per_second must be positive, got {frames_per_second}")
        for i, d in enumerate(durations):
            if not (math.isfinite(d) and d >= 0.0):
                raise UserError(f"utterance {i}: invalid duration {d!r}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.durations = np.asarray(durations, dtype=np.float64)
        self.frames = np.array(
            [duration_to_frames(d, frames_per_second) for d in durations], dtype=np.int64
        )
        self.languages = list(languages)
        self._buckets = np.floor(self.durations / config.bucket_width_s).astype(np.int64)
        if config.mode == "monolingual":
            names = sorted(set(self.languages))
            self._groups = [
                np.array(
                    [i for i, lang in enumerate(self.languages) if lang == name], dtype=np.int64
                )
                for name in names
            ]
        else:
            self._groups = [np.arange(len(self.languages), dtype=np.int64)]
        self.oversized = int((self.frames > config.max_frames).sum())
        if self.oversized:
            warnings.warn(
                f"{self.oversized} utterance(s) exceed max_frames={config.max_frames} on their own "
                "and form single-utterance batches",
                stacklevel=2,
            )
        self.epoch = 0
        self._resume_from = 0  # batches to skip at the next __iter__ (set by load_state_dict)
        self._consumed = 0  # batches yielded in the current epoch
        self._cache: tuple[int, list[list[int]]] | None = None

    # --- epoch plan ------------------------------------------------------------------------

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, epoch, stream])

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        cfg = self.config
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in order.tolist():
            f = int(self.frames[i])
            new_longest = max(longest, f)
            if cur and (
                (len(cur) + 1) * new_longest > cfg.max_frames or len(cur) + 1 > cfg.max_batch
            ):
                batches.append(cur)
                cur, new_longest = [], f
            cur.append(i)
            longest = new_longest
        leftover = len(cur) < cfg.max_batch and (len(cur) + 1) * longest <= cfg.max_frames
        if cur and not (cfg.drop_last and leftover and batches):
            batches.append(cur)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` before sharding (deterministic)."""
        cfg = self.config
        groups: list[list[list[int]]] = []
        for g, members in enumerate(self._groups):
            if cfg.shuffle:
                tiebreak = self._rng(epoch, g + 1).permutation(len(members))
                order = members[np.lexsort((tiebreak, self._buckets[members]))]
            else:
                order = members[np.lexsort((members, self.durations[members]))]
            groups.append(self._pack(order))
        if cfg.order == "round-robin":
            if cfg.shuffle:  # streams after the tiebreaks' 1..len(groups)
                streams = (self._rng(epoch, len(groups) + 1 + g) for g in range(len(groups)))
                groups = [[b[j] for j in rng.permutation(len(b))] for b, rng in zip(groups, streams, strict=True)]
            turns = max((len(b) for b in groups), default=0)
            return [b[i] for i in range(turns) for b in groups if i < len(b)]
        batches = [b for group in groups for b in group]
        if cfg.shuffle:
            perm = self._rng(epoch, 0).permutation(len(batches))
            batches = [batches[j] for j in perm]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self.epoch_batches(self.epoch)
            usable = len(batches) // self.world_size * self.world_size
            self._cache = (self.epoch, batches[self.rank : usable : self.world_size])
        return self._cache[1]

    # --- iteration and state ---------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``__iter__`` yields (from its start)."""
        self.epoch = int(epoch)
        self._resume_from = 0
        self._consumed = 0

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (a resumed pass yields fewer)."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._resume_from = self._resume_from, 0
        self._consumed = start
        for b in batches[start:]:
            self._consumed += 1
            yield list(b)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Position to resume from: ``epoch``, ``consumed`` batches of it, ``seed``.

        A ``DataLoader`` draws batches ahead of training; pass the number of batches actually
        trained on as ``consumed`` then (default: batches yielded so far by this sampler).
        """
        return {
            "epoch": self.epoch,
            "consumed": self._consumed if consumed is None else int(consumed),
            "seed": self.config.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``__iter__`` yields the batches of ``state['epoch']`` after the
        ``consumed`` first ones, exactly as an uninterrupted run would have."""
        if int(state["seed"]) != self.config.seed:
            raise UserError(
                f"sampler state has seed {state['seed']}, the config has {self.config.seed}: "
                "resuming would not reproduce the interrupted run"
            )
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise UserError(
                f"sampler state was saved with world size {state['world_size']}, "
                f"now {self.world_size}"
            )
        self.set_epoch(int(state["epoch"]))
        consumed = int(state["consumed"])
        if not 0 <= consumed <= len(self):
            raise UserError(f"sampler state: {consumed} batches consumed, epoch has {len(self)}")
        self._resume_from = consumed
        self._consumed = consumed
