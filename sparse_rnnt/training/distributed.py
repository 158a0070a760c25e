"""Multi-process data-parallel training on ``torch.distributed`` (launch with ``torchrun``).

``torchrun --nproc-per-node N -m sparse_rnnt.cli train|prune ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); the :class:`~sparse_rnnt.training.trainer.Trainer`
reads them through :func:`from_environment`, joins the process group (NCCL on CUDA, gloo on CPU) and
trains on ``cuda:LOCAL_RANK``. ``WORLD_SIZE=1`` (or no variables) is an ordinary single-process run.

Design (why not ``DistributedDataParallel``):

- **Global batches.** The batch sampler runs unsharded and identically on every rank: its batches
  are the *global* batches (``batch.max_frames`` / ``max_batch`` are global budgets). Each global
  batch is split into ``WORLD_SIZE`` contiguous, near-equal parts (:func:`split_batch`); rank ``r``
  trains on part ``r``. Every rank therefore trains the same step on the same language (monolingual
  batches: dynamic pathways and pathways pick the mask per step), and an N-process run sees exactly
  the batches of a single-process run. The sampler's own ``rank::world_size`` sharding cannot be
  used: neighbouring batches of the shuffled list belong to different languages.
- **Explicit gradient all-reduce** (:meth:`Distributed.reduce_gradients`), once per optimizer step,
  after every backward pass of the step. Each rank scales its loss by its share of the global
  batch (``n_r / N``, the loss is a per-utterance mean), so the SUM over ranks is the global batch's
  mean gradient even when the parts differ in size, or a rank got no utterance at all (a global
  batch smaller than the world). DDP would average equally weighted parts and needs every rank to
  run a forward. Pathways ``"sum"`` moves each language's masked gradient out of ``.grad``
  (``accumulate_grads``) between backward passes: DDP's per-backward bucket all-reduce would fire
  once per language (or, under ``no_sync``, never for the moved gradients), so the trainer reduces
  once, after ``before_optimizer_step`` has written ``Σ_l m_l ⊙ g_l`` back into ``.grad``.
- **Masks commute with averaging.** All ranks hold the same masks (checked after every mask
  update by :meth:`Distributed.check_masks`, which fails loudly) and train the same language in a
  step, so ``mean_r(m_l ⊙ g_r) = m_l ⊙ mean_r(g_r)`` exactly (masking writes exact zeros). After the
  all-reduce every rank holds identical gradients, so the clipping norm, the Adam step, the
  restored frozen weights and the next re-rank are identical on every rank. Soft masking
  (``param.data`` substitution, or the triton ``MaskedLinear`` swap) stays per process and needs no
  special care: nothing hooks the parameters.
- **Rank 0 writes.** Only rank 0 writes the config, tokenizer, CMVN stats, data report, metrics,
  TensorBoard logs, checkpoints, mask snapshots and analytics, and evaluates on dev; the others
  wait in :meth:`Distributed.on_main`, which also carries a rank-0 failure to every rank.
- **Dropout.** Each rank reseeds torch from ``(seed, step, rank)`` before every step
  (:meth:`Distributed.seed_step`): ranks draw different dropout masks, and a resumed run draws the
  same ones as an uninterrupted run.
- **Resume.** The global batch schedule does not depend on the world size, so a run can resume on
  a different number of ranks: the remaining global batches are re-split over the new ranks
  (results then differ from an uninterrupted run by float summation order and dropout draws only).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

if TYPE_CHECKING:
    from ..data.dataset import Batch
    from ..pruning.methods import Pruner

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rank 0 may evaluate on dev or write a checkpoint while the others wait in a collective.
TIMEOUT = timedelta(minutes=60)
# Gradients are all-reduced in buckets of at most this many elements (bounds the extra memory).
BUCKET_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class DistEnv:
    """The launcher's view of this process: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as set by ``torchrun``, or None
    for a single process (variables absent or ``WORLD_SIZE=1``)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    values: dict[str, int] = {}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        raw = env.get(key)
        if raw is None:
            if key == "LOCAL_WORLD_SIZE":  # optional: a single node is assumed
                continue
            raise UserError(f"WORLD_SIZE is set but {key} is not: launch with torchrun")
        try:
            values[key] = int(raw)
        except ValueError:
            raise UserError(f"environment variable {key}={raw!r} is not an integer") from None
    world = values["WORLD_SIZE"]
    if world < 1 or not 0 <= values["RANK"] < world:
        raise UserError(f"RANK={values['RANK']} outside WORLD_SIZE={world}")
    if world == 1:
        return None
    return DistEnv(
        rank=values["RANK"], world_size=world, local_rank=values["LOCAL_RANK"],
        local_world_size=values.get("LOCAL_WORLD_SIZE", world),
    )


def split_batch(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch: sizes differ by at most one, the first
    ``len % world_size`` ranks take the larger parts; empty when ``len(indices) <= rank``.

    The parts, concatenated in rank order, are ``indices`` (a duration-sorted batch stays sorted,
    so each part pads little)."""
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(indices[start:stop])


@dataclass
class Shard:
    """This rank's part of a global batch.

    ``batch`` is None when the global batch has fewer utterances than there are ranks and this rank
    got none; ``global_size`` counts the global batch's utterances and ``languages`` are its
    (sorted, distinct) languages, the same on every rank.
    """

    batch: Batch | None
    global_size: int
    languages: tuple[str, ...]

    @property
    def weight(self) -> float:
        """This rank's share of the global batch, ``n_r / N``: the factor on its mean loss."""
        return 0.0 if self.batch is None else len(self.batch) / self.global_size


def as_shard(batch: Batch | Shard) -> Shard:
    """A plain :class:`Batch` is a whole global batch (single process)."""
    if isinstance(batch, Shard):
        return batch
    return Shard(batch=batch, global_size=len(batch), languages=tuple(sorted(set(batch.languages))))


def mask_digest(pruner: Pruner) -> bytes:
    """sha256 over every mask of ``pruner`` (per language, in the pruner's language order): names,
    shapes and packed bits."""
    h = hashlib.sha256()
    sets = [(lang, pruner.masks(lang)) for lang in pruner.languages] if pruner.multilingual else [("", pruner.masks())]
    for lang, masks in sets:
        h.update(f"[{lang}]".encode())
        packed, shapes = masks.pack()
        for name, bits in packed.items():
            h.update(f"{name}{shapes[name]}".encode())
            h.update(bits.detach().cpu().numpy().tobytes())
    return h.digest()


def state_digest(model: nn.Module) -> bytes:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        x = t.detach().cpu().contiguous()
        h.update(f"{name}{x.dtype}{list(x.shape)}".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class Distributed:
    """The process group this process joined, and the collectives the trainer needs."""

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        """Join (or reuse) the default process group: NCCL when ``device`` is CUDA, else gloo."""
        self.env = env
        self.rank = env.rank
        self.world_size = env.world_size
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._owned = False
        if not dist.is_available():
            raise UserError("torch.distributed is not available in this torch build")
        if dist.is_initialized():
            if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
                raise RuntimeError(
                    f"process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"the environment says {env.rank} of {env.world_size}"
                )
        else:
            dist.init_process_group(self.backend, timeout=TIMEOUT)
            self._owned = True
        log.info("distributed: rank %d of %d (%s, %s)", self.rank, self.world_size, self.backend, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if this object created it."""
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        self._owned = False

    # -- control flow ---------------------------------------------------------------------------

    def on_main(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on rank 0 while the others wait; a failure on rank 0 is raised on every rank
        (:class:`UserError` stays a UserError). Returns ``fn()`` on rank 0, None elsewhere."""
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # re-raised below, after telling the others
                error = e
        status: list[object] = [None if error is None else (isinstance(error, UserError), str(error))]
        dist.broadcast_object_list(status, src=0, device=self._object_device())
        if error is not None:
            raise error
        if status[0] is not None:
            is_user, msg = status[0]  # type: ignore[misc]
            if is_user:
                raise UserError(str(msg))
            raise RuntimeError(f"rank 0 failed to {what}: {msg}")
        return result

    def everywhere(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if any rank fails, every rank raises (naming the first one)."""
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as e:  # re-raised below, after telling the others
            error = e
        statuses: list[object] = [None] * self.world_size
        mine = None if error is None else (isinstance(error, UserError), str(error))
        dist.all_gather_object(statuses, mine)
        if error is not None:
            raise error
        for r, st in enumerate(statuses):
            if st is not None:
                is_user, msg = st  # type: ignore[misc]
                if is_user:
                    raise UserError(str(msg))
                raise RuntimeError(f"rank {r} failed to {what}: {msg}")
        return result  # type: ignore[return-value]

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def seed_step(self, seed: int, step: int) -> None:
        """Reseed torch (dropout) from ``(seed, step, rank)``: different per rank, resumable."""
        words = hashlib.sha256(f"{seed}/{step}/{self.rank}".encode()).digest()
        torch.manual_seed(int.from_bytes(words[:8], "little") & ((1 << 63) - 1))

    # -- reductions -----------------------------------------------------------------------------

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order (picklable objects; every rank must call it)."""
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out  # type: ignore[return-value]

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Sum of each value over the ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def reduce_gradients(self, params: Sequence[nn.Parameter], values: Sequence[float] = ()) -> list[float]:
        """SUM-all-reduce every ``param.grad`` (a missing one counts as zeros) and ``values``.

        The caller scaled its loss by its share of the global batch, so the sums are the global
        batch's mean gradient. A parameter keeps ``grad = None`` only if no rank produced a
        gradient for it (Adam then skips it, as in a single-process run). Returns the summed
        ``values`` (e.g. share-weighted losses: the global-batch means).
        """
        present = [0.0 if p.grad is None else 1.0 for p in params]
        totals = self.sum_values([*present, *values])
        any_grad, summed = totals[: len(params)], totals[len(params):]
        active = [p for p, flag in zip(params, any_grad, strict=True) if flag > 0]
        for p in active:
            if p.grad is None:  # this rank's part did not reach it (or this rank had no utterance)
                p.grad = torch.zeros_like(p)
        # Bucket by dtype and size: one flat all-reduce per bucket.
        buckets: dict[torch.dtype, list[list[nn.Parameter]]] = {}
        for p in active:
            grad = p.grad
            assert grad is not None
            lists = buckets.setdefault(grad.dtype, [[]])
            if lists[-1] and sum(q.numel() for q in lists[-1]) + p.numel() > BUCKET_ELEMENTS:
                lists.append([])
            lists[-1].append(p)
        for lists in buckets.values():
            for group in lists:
                grads = [p.grad for p in group]
                flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for g in grads:
                    assert g is not None
                    n = g.numel()
                    g.copy_(flat[offset:offset + n].view_as(g))
                    offset += n
        return summed

    # -- consistency checks ---------------------------------------------------------------------

    def _check_digest(self, digest: bytes, what: str) -> None:
        mine = torch.tensor(list(digest), dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        hexes = [bytes(int(x) for x in t.tolist()).hex()[:16] for t in gathered]
        bad = [r for r in range(1, self.world_size) if hexes[r] != hexes[0]]
        if bad:
            raise RuntimeError(
                f"{what} differ across ranks: rank(s) {', '.join(map(str, bad))} disagree with rank 0 "
                f"(sha256 prefixes: {', '.join(f'rank {r} {h}' for r, h in enumerate(hexes))}); "
                "the ranks no longer train the same model"
            )

    def check_masks(self, pruner: Pruner, step: int) -> None:
        """All-gather a sha256 of every mask; raise RuntimeError naming ``step`` and the ranks
        that disagree with rank 0. Every rank must call it at the same step."""
        self._check_digest(mask_digest(pruner), f"pruning masks after step {step}")

    def check_model(self, model: nn.Module, step: int) -> None:
        """As :meth:`check_masks`, for the model's parameters and buffers."""
        self._check_digest(state_digest(model), f"model weights at step {step}")
