"""Pruning methods as objects a trainer drives: IMP, LTH, LAP, adaptive masking, Dynamic ASR Pathways.

Driving protocol (one optimizer step; ``step`` counts *completed* optimizer steps)::

    pruner = Pruner(PruningConfig(method="adaptive"), model, languages=None)
    pruner.prepare()                              # theta0 := copy of in-scope weights; step-0 masks
    for step in range(1, num_steps + 1):
        with pruner.masked_forward(language):     # forward AND backward inside the context
            loss = model(...).loss
            loss.backward()
        pruner.before_optimizer_step(step, language)
        optimizer.step(); optimizer.zero_grad()
        pruner.after_optimizer_step(step)
        pruner.update_mask(step, language)        # True if a mask changed

Methods (``PruningConfig.method``):

- ``"imp"`` (hard): masks fixed between sparsity steps. ``before_optimizer_step`` zeroes the
  gradients of pruned weights, ``after_optimizer_step`` re-zeroes pruned weights (Adam's moments
  would move them). At each sparsity step (``schedule.is_prune_step(step)``) the smallest-magnitude
  *kept* weights are pruned to the new level (``candidates`` = current mask), so masks are nested.
- ``"lth"`` (hard): as IMP, and after each pruning event the kept weights are rewound to theta0
  exactly (pruned weights stay 0).
- ``"lap"`` (hard): language-agnostic pruning = IMP on mixed batches, one mask for all languages.
- ``"adaptive"`` (soft, monolingual): pruned weights are set to zero at every mask update but
  stay trainable: the forward uses ``theta ⊙ m`` and every weight receives its (straight-through)
  gradient, so a pruned weight regrows from zero. Every ``adapt_every`` steps the mask is
  re-ranked over ALL weights at the current level (pruned weights that regrew come back); at
  sparsity steps it is re-ranked at the new level. ``variant="lth"``: at sparsity steps the mask
  is ranked on the trained (pre-rewind) weights, THEN the weights are rewound to theta0 and the
  pruned ones set to zero. (Keeping the pruned weights' old values instead lets Adam, which
  moves every weight by about ``lr`` per step whatever its gradient's size, inflate them until
  they win the next re-rank with meaningless values: measured on the demo model, 45-56% dev WER
  against 3-16% for IMP.)
- ``"dynamic-pathways"`` (soft, multilingual): one mask per language over shared weights. Language
  z re-ranks only inside ``LanguageMasks.selectable_zone(z)`` (its free zone plus its own pathway),
  keeping ``(1 - level) * |theta|`` weights (global ranking) or per tensor. Soft re-ranks are
  language-specific, as the training between sparsity steps is: every ``adapt_every`` steps a
  window opens in which each language is re-ranked once, right after its own next batch (the
  step's language at once, the others as their batches come; pass ``language=`` to
  :meth:`update_mask`, ``None`` re-ranks every language still due). Re-ranking every language
  at every re-rank step instead ranks them all on the same weights: languages that start from
  one mask (a LAP start) then never part. At a sparsity step ALL languages are re-ranked
  together (language-agnostic) and the window closes. The languages of one event are re-ranked
  together: every zone is computed from the masks as they were before the event, so the order
  of ``languages`` does not matter, and two languages may both take a free weight (it becomes
  shared), but none takes a weight that another language alone kept before the event.
  A language-z step trains only z's selectable zone: ``before_optimizer_step`` zeroes the gradients
  outside it and snapshots those weights; ``after_optimizer_step`` restores them exactly (Adam
  momentum would otherwise move weights owned only by other languages). One language per optimizer
  step (alternating batches). After every mask update the weights that no language keeps are set
  to zero (soft pruning: they still train and can regrow). ``variant="lth"`` rewinds all weights
  to theta0 after the sparsity step's re-ranking. Start from given masks with :meth:`Pruner.init_masks` (LAP or LTH masks).
- ``"pathways"`` (hard, multilingual): ASR Pathways stage 2 (Yang et al. 2023). The per-language
  masks ``m_l`` come from stage 1 (per-language IMP/LTH runs) through :meth:`Pruner.init_masks`
  (a :class:`LanguageMasks`, REQUIRED after :meth:`Pruner.prepare` and before any hook) and stay
  fixed: the schedule is ignored and ``update_mask`` never changes them. Weights outside the union
  of the masks are zeroed by ``init_masks`` and stay zero. ``masked_forward(z)`` runs the forward
  with ``theta ⊙ m_z`` (a weight pruned for z is zero in z's forward even if another language keeps
  it). Each language's batch trains only its own pathway (gradient ``m_l ⊙ g_l``); weights shared
  by several pathways get updates from all of them. ``PruningConfig.aggregation``:

  - ``"alternate"`` (default): one language per optimizer step, as dynamic pathways.
    ``before_optimizer_step(step, z)`` masks the gradients with ``m_z`` and snapshots the weights
    outside ``m_z``; ``after_optimizer_step`` restores them exactly (Adam momentum from other
    languages' steps would otherwise move them).
  - ``"sum"``: one batch per language per optimizer step. After each language's backward call
    :meth:`Pruner.accumulate_grads` ``(language)``: it adds ``m_l ⊙ g_l`` to a running sum and zeroes
    ``.grad``; ``before_optimizer_step(step, None)`` writes the sum into ``.grad``::

        for lang in languages:
            with pruner.masked_forward(lang):
                loss_of(lang).backward()
            pruner.accumulate_grads(lang)
        pruner.before_optimizer_step(step, None)
        optimizer.step(); optimizer.zero_grad()
        pruner.after_optimizer_step(step)

  Parameters outside the pruning scope (biases, norms) are not masked: they get ``g_z``
  (alternate) or, since ``.grad`` accumulates across backward passes, ``Σ_l g_l`` (sum).

Soft masking (:meth:`Pruner.masked_forward`): inside the context each in-scope ``param.data`` is
replaced by ``theta ⊙ m`` and restored to the saved dense ``theta`` on exit. The gradient is thus
evaluated at ``m ⊙ theta`` and lands on (and is later applied to) every entry of ``theta``: a
straight-through estimator, so pruned weights keep receiving gradient. The backward pass MUST run
inside the context (autograd saved the masked weights). For hard methods the context is a no-op.

Schedules: ``"staircase"`` (``levels``, one step every ``interval``; ``levels[-1]`` must equal
``target_sparsity``), ``"oneshot"`` (``target_sparsity`` at step 0), ``"cubic"`` (from ``levels[0]``
to ``levels[-1] = target_sparsity`` over ``interval * max(1, len(levels) - 1)`` steps, an event every
``interval``, with ``t0 = 0``: the levels between give only the number of events, their
sparsities come from the cubic). A level in force at step 0 is applied by :meth:`Pruner.prepare`; ``update_mask``
ignores step 0.

Backends (``PruningConfig.backend``): ``"torch"`` ranks with :func:`ranking.magnitude_masks` and
masks the forward by substituting ``theta ⊙ m``; ``"triton"`` ranks with the exact radix-select
kernel (``sparse_rnnt.kernels.rerank``, bit-identical masks) and, for soft methods and pathways,
swaps the in-scope ``nn.Linear`` layers for :class:`~sparse_rnnt.model.masked.MaskedLinear`
(fused masked matmul, mask as row-packed bits, ``W ⊙ M`` never materialized; undone by
:meth:`Pruner.close`); in-scope weights outside linear layers still use the substitution.
``"auto"`` (default) picks triton when the model is on CUDA. Both give the same masks; outputs
agree to float rounding. ``PruningConfig.rerank_algorithm`` picks the triton backend's unstructured
selection (``"atomic"``, ``"radix"``, ``"window"``: same masks, different speed), and
``PruningConfig.autocast_path`` how the swapped layers run under autocast (``"cast"``: the mask
applied in autocast's weight copy, then cuBLAS; ``"fused"``: the fused kernel on the copy).

History: ``Pruner.history`` holds one dict per mask update: ``step``, ``event`` (``"level"`` or
``"rerank"``), ``level`` (target), ``sparsity`` (achieved), ``churn`` (fraction of the mask's
weights flipped), and ``language`` for dynamic pathways.

Checkpoints: :meth:`Pruner.state_dict` returns ``{"meta": JSON-able dict, "tensors": {key: Tensor}}``
with tensor keys ``mask/<param>`` (or ``mask/<lang>/<param>``, bit-packed by
:meth:`MaskSet.pack`) and ``theta0/<param>``, ready for safetensors + JSON. Model weights and
optimizer state are not included (the trainer saves them).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import is_int
from ..errors import UserError
from ..model.masked import AUTOCAST_PATHS, LinearSwap, swap_linears
from .masks import LanguageMasks, MaskSet
from .ranking import SCOPES, Granularity, magnitude_masks, pruned_count
from .schedules import SparsitySchedule, schedule_from_config
from .scope import ScopeConfig, select_parameters

METHODS: tuple[str, ...] = ("imp", "lth", "lap", "adaptive", "dynamic-pathways", "pathways")
HARD_METHODS: frozenset[str] = frozenset({"imp", "lth", "lap", "pathways"})
MULTILINGUAL_METHODS: frozenset[str] = frozenset({"dynamic-pathways", "pathways"})
AGGREGATIONS: tuple[str, ...] = ("alternate", "sum")
VARIANTS: tuple[str, ...] = ("imp", "lth")
SCHEDULE_KINDS: tuple[str, ...] = ("staircase", "cubic", "oneshot")
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
RERANK_ALGORITHMS: tuple[str, ...] = ("atomic", "radix", "window")
STATE_FORMAT = "sparse_rnnt.pruner"
STATE_VERSION = 1

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PruningConfig:
    """What to prune, how and when. See the module docstring for each field's meaning.

    Defaults: staircase 0.2 -> 0.5 -> 0.7, T = ``interval`` = 1000 steps, soft re-rank every
    ``adapt_every`` = 100 steps, global unstructured magnitude ranking over the default scope.
    ``aggregation`` (``"alternate"`` or ``"sum"``) is used by ``method="pathways"`` only.
    """

    method: str
    target_sparsity: float = 0.7
    schedule: str = "staircase"
    levels: tuple[float, ...] = (0.2, 0.5, 0.7)
    interval: int = 1000
    adapt_every: int = 100
    variant: str = "imp"
    granularity: Granularity = field(default_factory=Granularity)
    ranking: str = "global"
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    aggregation: str = "alternate"
    # Starting masks (read by the trainer, see sparse_rnnt.training.stage_masks): "" = none, a
    # path (run or checkpoint directory, or masks file), or "lang=path,lang=path" per language.
    init_masks: str = ""
    # With a run directory in init_masks: take the mask saved when that run reached this level.
    init_level: float | None = None
    # Kernels for re-ranking and masked forward/backward: "triton", "torch", or "auto" (triton
    # when the model is on CUDA, torch otherwise). The choice is logged.
    backend: str = "auto"
    # How the triton backend finds unstructured thresholds: "atomic", "radix" or "window" (see
    # sparse_rnnt.kernels.rerank); all three give the same masks, they differ in speed.
    rerank_algorithm: str = "atomic"
    # How the triton backend's masked linear layers run under autocast: "cast" (the mask is
    # applied in the weight copy autocast makes anyway, then cuBLAS) or "fused" (plain copy, then
    # the fused masked kernel). Same values and gradients (sparse_rnnt.model.masked).
    autocast_path: str = "cast"

    def __post_init__(self) -> None:
        if isinstance(self.levels, list):
            object.__setattr__(self, "levels", tuple(self.levels))

    @property
    def soft(self) -> bool:
        """Soft (straight-through) masking: adaptive and dynamic pathways."""
        return self.method not in HARD_METHODS

    def validate(self) -> None:
        """Raise :class:`UserError` naming the bad field and value."""
        if self.method not in METHODS:
            raise UserError(f"pruning.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        ts = self.target_sparsity
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0.0 < ts < 1.0:
            raise UserError(f"pruning.target_sparsity must be a number in (0, 1), got {ts!r}")
        if self.schedule not in SCHEDULE_KINDS:
            raise UserError(f"pruning.schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {self.schedule!r}")
        if not isinstance(self.levels, tuple) or not self.levels:
            raise UserError(f"pruning.levels must be a non-empty list of sparsities, got {self.levels!r}")
        for level in self.levels:  # every schedule, also oneshot (which does not read them)
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level < 1.0:
                raise UserError(f"pruning.levels must hold sparsities in [0, 1), got {list(self.levels)}")
        for name in ("interval", "adapt_every"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise UserError(f"pruning.{name} must be an integer > 0, got {value!r}")
        # Only the soft methods re-rank every adapt_every steps; the hard ones never read it.
        if self.soft and self.adapt_every >= self.interval:
            raise UserError(
                f"pruning.adapt_every ({self.adapt_every}) must be smaller than pruning.interval "
                f"({self.interval}) for pruning.method {self.method}: re-ranking happens several "
                "times per sparsity step"
            )
        if self.variant not in VARIANTS:
            raise UserError(f"pruning.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.ranking not in SCOPES:
            raise UserError(f"pruning.ranking must be one of {', '.join(SCOPES)}, got {self.ranking!r}")
        if self.schedule in ("staircase", "cubic") and self.levels[-1] != ts:
            raise UserError(
                f"pruning.levels must end at pruning.target_sparsity ({ts}), got {list(self.levels)}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise UserError(
                f"pruning.aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )
        if self.backend not in BACKENDS:
            raise UserError(f"pruning.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.rerank_algorithm not in RERANK_ALGORITHMS:
            raise UserError(f"pruning.rerank_algorithm must be one of {', '.join(RERANK_ALGORITHMS)}, "
                            f"got {self.rerank_algorithm!r}")
        if self.autocast_path not in AUTOCAST_PATHS:
            raise UserError(f"pruning.autocast_path must be one of {', '.join(AUTOCAST_PATHS)}, "
                            f"got {self.autocast_path!r}")
        if not isinstance(self.init_masks, str):
            raise UserError(f"pruning.init_masks must be a string, got {self.init_masks!r}")
        lvl = self.init_level
        if lvl is not None and (isinstance(lvl, bool) or not isinstance(lvl, (int, float)) or not 0.0 < lvl < 1.0):
            raise UserError(f"pruning.init_level must be a sparsity in (0, 1), got {lvl!r}")
        if lvl is not None and not self.init_masks.strip():
            raise UserError("pruning.init_level is set but pruning.init_masks is empty")
        self.granularity.validate()
        if self.granularity.kind == "nm":
            # N:M keeps exactly n of every m weights: one sparsity, 1 - n/m, and no other.
            g = self.granularity
            fixed = 1.0 - g.n / g.m
            used = [ts] if self.schedule == "oneshot" else [*self.levels, ts]
            if any(not math.isclose(x, fixed, rel_tol=0.0, abs_tol=1e-9) for x in used):
                got = (f"pruning.target_sparsity {ts:g}" if self.schedule == "oneshot"
                       else f"pruning.levels {','.join(f'{x:g}' for x in self.levels)} (target {ts:g})")
                raise UserError(
                    f"pruning.granularity {g.n}:{g.m} prunes exactly {fixed:g} of the weights, got {got}: "
                    f"pass --levels {fixed:g} (one sparsity step) or --schedule oneshot --target-sparsity {fixed:g}"
                )
        self.scope.validate()
        self.build_schedule()  # validates levels (increasing, in [0, 1))

    def build_schedule(self) -> SparsitySchedule:
        """The sparsity schedule this config describes (see the module docstring)."""
        if self.schedule == "staircase":
            return schedule_from_config("staircase", levels=self.levels, interval=self.interval)
        if self.schedule == "oneshot":
            return schedule_from_config("oneshot", sparsity=self.target_sparsity, step=0)
        return schedule_from_config(
            "cubic",
            initial=self.levels[0],
            final=self.target_sparsity,
            steps=self.interval * max(1, len(self.levels) - 1),
            frequency=self.interval,
        )


def check_initial_sparsity(config: PruningConfig, masks: MaskSet | LanguageMasks) -> None:
    """Refuse starting masks that a hard single-mask method (IMP, LTH, LAP) cannot prune to its
    first level: it prunes only among the kept weights, so a level below the masks' sparsity
    would need weights that are already gone (:class:`UserError` naming both sparsities)."""
    if config.method not in HARD_METHODS or config.method in MULTILINGUAL_METHODS or not isinstance(masks, MaskSet):
        return
    levels = config.build_schedule().levels()
    if not levels:
        return
    first = levels[0]
    # The counts ranking will ask for: ``total - pruned_count`` kept, globally or per tensor.
    groups = [masks.names] if config.ranking == "global" else [[n] for n in masks.names]
    for names in groups:
        total = sum(masks[n].numel() for n in names)
        kept = sum(int(masks[n].sum()) for n in names)
        if total and kept < total - pruned_count(first, total):
            sparsity = 1.0 - kept / total
            where = "" if config.ranking == "global" else f" (tensor {names[0]}, per-tensor ranking)"
            at_least = math.ceil(sparsity * 1000) / 1000
            raise UserError(
                f"the init masks are at sparsity {sparsity:.3f}{where}, above the first level {first:g}: "
                f"pass --levels starting at {at_least:g} or above (or masks from a lower --init-level)"
            )


def resolve_backend(choice: str, params: dict[str, nn.Parameter]) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA, else ``"torch"``; ``"triton"`` off CUDA needs the Triton
    interpreter (``TRITON_INTERPRET=1``, slow: for tests)."""
    on_cuda = bool(params) and all(p.is_cuda for p in params.values())
    if choice == "auto":
        return "triton" if on_cuda else "torch"
    if choice == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(
            "pruning.backend triton needs the model on CUDA (or TRITON_INTERPRET=1 for the slow "
            "CPU interpreter); use pruning.backend=torch or auto"
        )
    return choice


class Pruner:
    """Masks over the in-scope weights of ``model`` and the rules to update them (module docstring)."""

    def __init__(self, config: PruningConfig, model: nn.Module, languages: list[str] | None = None) -> None:
        config.validate()
        self.config = config
        self.model = model
        self.params: dict[str, nn.Parameter] = select_parameters(model, config.scope)
        self.schedule = config.build_schedule()
        self.multilingual = config.method in MULTILINGUAL_METHODS
        if self.multilingual:
            if not languages:
                raise UserError(f"pruning.method {config.method} needs the list of languages")
            if len(set(languages)) != len(languages):
                raise UserError(f"duplicate languages for {config.method}: {languages}")
        self.languages: list[str] = list(languages or [])
        self.level: float = 0.0
        self.history: list[dict[str, Any]] = []
        # dynamic-pathways: languages whose soft re-rank of this adapt_every window is still to come
        # (each is re-ranked after its own next batch: language-specific, as its training is).
        self._rerank_due: set[str] = set()
        self.theta0: dict[str, Tensor] = {}
        self._mask: MaskSet | None = None
        self._lang_masks: LanguageMasks | None = None
        self._frozen: dict[str, tuple[Tensor, Tensor]] | None = None
        # ASR Pathways stage 2: fixed masks given (init_masks / load_state_dict), their union
        # (cached: masks never change) and the running sum of masked gradients ("sum").
        self.pathways = config.method == "pathways"
        self._pathway_masks_given = False
        self._union: MaskSet | None = None
        self._grad_sum: dict[str, Tensor] | None = None
        self.backend = resolve_backend(config.backend, self.params)
        # Triton: soft methods and pathways run their masked forward through the fused masked
        # linear (swapped in now, undone by close()); hard single-mask methods keep exact zeros
        # in theta and need no masking in the forward.
        self._swap: LinearSwap | None = None
        self._packed: dict[str | None, tuple[MaskSet, dict[str, Tensor]]] = {}
        if self.backend == "triton" and (config.soft or self.pathways):
            self._swap = swap_linears(model, list(self.params), autocast_path=config.autocast_path)
        log.info("pruning %s: backend %s (config %r)%s", config.method, self.backend, config.backend,
                 f", {len(self._swap.layers)} linear layers swapped for fused masked ones (under autocast: "
                 f"{config.autocast_path})" if self._swap else "")

    # ---- setup
    def prepare(
        self,
        dense_state: dict[str, Tensor] | None = None,
        initial_masks: MaskSet | LanguageMasks | None = None,
    ) -> None:
        """Remember theta0 (``dense_state[name]`` or the model's current in-scope weights, copied)
        and set the step-0 masks: ``initial_masks`` (see :meth:`init_masks`) or all ones, then the
        schedule's level if step 0 is a prune step (applied to the initial masks: a hard method
        prunes among their kept weights, dynamic pathways re-ranks inside the zones they define)."""
        self.theta0 = {}
        for name, p in self.params.items():
            src = p.detach() if dense_state is None else dense_state.get(name)
            if src is None:
                raise UserError(f"dense state for pruning has no tensor {name!r}")
            if tuple(src.shape) != tuple(p.shape):
                raise UserError(f"dense state {name!r} has shape {list(src.shape)}, model has {list(p.shape)}")
            self.theta0[name] = src.detach().to(device=p.device, dtype=p.dtype).clone()
        ones = MaskSet.ones_like(self.params)
        if self.multilingual:
            self._lang_masks = LanguageMasks({lang: ones.clone() for lang in self.languages})
        else:
            self._mask = ones
        self.level = 0.0
        if self.pathways:
            # Stage-2 masks are fixed and come from init_masks; the schedule is not used.
            self._pathway_masks_given = False
            self._union = None
            self._grad_sum = None
            self._frozen = None
            if initial_masks is not None:
                self.init_masks(initial_masks)
            return
        if initial_masks is not None:
            self.init_masks(initial_masks)
        if self.schedule.is_prune_step(0):
            self._level_event(0)

    def init_masks(self, masks: MaskSet | LanguageMasks) -> None:
        """Start from given masks (dynamic pathways: a LanguageMasks, e.g. LTH masks, or one MaskSet
        copied to every language, e.g. a LAP mask; others: a MaskSet). Hard methods zero the pruned
        weights at once. If no schedule level is in force yet, the current level becomes the masks'
        achieved sparsity (mean over languages), so re-ranks before the next sparsity step keep
        that many weights. Called right after :meth:`prepare`, whose step-0 sparsity step ran on
        all-ones masks, it undoes that step (weights back to theta0) and runs it on these masks:
        the same as ``prepare(initial_masks=masks)``. Refused (``UserError``) once masks have been
        updated after step 0."""
        self._require_prepared()
        redo_step0 = False
        if not self.pathways and self.history:
            # prepare() already ran the step-0 sparsity step, on all-ones masks: undo it (weights
            # back to theta0) and run it on these masks, exactly as prepare(initial_masks=...) does.
            if any(h.get("step") != 0 for h in self.history):
                raise UserError("Pruner.init_masks gives the starting masks: call it right after prepare() "
                                "(or pass prepare(initial_masks=...)), not once masks have been updated")
            self._rewind_all()
            self.history = []
            self.level = 0.0
            redo_step0 = True
        if self.pathways and not isinstance(masks, LanguageMasks):
            raise UserError(
                "pruning.method pathways takes the stage-1 per-language masks (a LanguageMasks), "
                f"got {type(masks).__name__}"
            )
        if self.multilingual:
            if isinstance(masks, MaskSet):
                masks = LanguageMasks({lang: masks.clone() for lang in self.languages})
            if sorted(masks.languages) != sorted(self.languages):
                raise UserError(f"initial masks cover languages {masks.languages}, pruner has {self.languages}")
            self._check_layout(masks[self.languages[0]])
            self._lang_masks = LanguageMasks({lang: self._on_weights(masks[lang]) for lang in self.languages})
            if self.config.soft:
                self._zero_unused()
            if self.pathways:
                self._set_pathways_ready()
                assert self._union is not None
                self._union.apply_(self.params)  # weights no pathway uses are zero from now on
        else:
            if not isinstance(masks, MaskSet):
                raise UserError(f"method {self.config.method} takes one MaskSet as initial masks")
            self._check_layout(masks)
            self._mask = self._on_weights(masks)
            self._mask.apply_(self.params)
        if redo_step0:
            self._level_event(0)
            return
        if self.level > 0.0:
            return  # a schedule level is in force (step-0 event): re-ranks keep using it
        if self._lang_masks is not None:
            self.level = sum(self._lang_masks[lang].sparsity() for lang in self.languages) / len(self.languages)
        else:
            assert self._mask is not None
            self.level = self._mask.sparsity()

    def _on_weights(self, masks: MaskSet) -> MaskSet:
        """A copy of ``masks`` on their weights' devices (masks from a file are on the CPU; the
        re-rank kernels take candidates where the weights are)."""
        return MaskSet({n: m.to(self.params[n].device, copy=True) for n, m in masks.items()})

    def _check_layout(self, masks: MaskSet) -> None:
        want = {n: list(p.shape) for n, p in self.params.items()}
        if masks.shapes != want:
            raise UserError(f"initial masks do not match the pruning scope: {masks.shapes} vs {want}")

    def _require_prepared(self) -> None:
        if self._mask is None and self._lang_masks is None:
            raise RuntimeError("Pruner.prepare() must be called first")

    # ---- ASR Pathways stage 2
    def _set_pathways_ready(self) -> None:
        assert self._lang_masks is not None
        self._pathway_masks_given = True
        self._union = self._lang_masks.union()
        self._grad_sum = None
        self._frozen = None

    def _require_pathway_masks(self) -> None:
        if not self._pathway_masks_given:
            raise UserError(
                "pruning.method pathways needs the stage-1 per-language masks: call "
                "Pruner.init_masks(LanguageMasks) after Pruner.prepare() and before training"
            )

    def _require_aggregation(self, mode: str) -> None:
        if self.config.aggregation != mode:
            raise ValueError(
                f"this call is for pruning.aggregation={mode!r}, the config says "
                f"{self.config.aggregation!r}"
            )

    def accumulate_grads(self, language: str) -> None:
        """Pathways, ``aggregation="sum"``: add ``m_language ⊙ .grad`` (each ``[*param.shape]``) to
        the running sum, then zero the in-scope ``.grad``. Call after each language's backward."""
        if not self.pathways:
            raise ValueError(f"accumulate_grads is for pruning.method pathways, not {self.config.method}")
        self._require_pathway_masks()
        self._require_aggregation("sum")
        mask = self.masks(self._lang(language))
        if self._grad_sum is None:
            self._grad_sum = {}
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    continue  # parameter not reached by this language's loss
                g = p.grad.masked_fill(~mask[name].to(p.grad.device), 0)
                if name in self._grad_sum:
                    self._grad_sum[name] += g
                else:
                    self._grad_sum[name] = g
                p.grad.zero_()

    def _pathways_before_step(self, language: str | None) -> None:
        self._require_pathway_masks()
        if self.config.aggregation == "sum":
            if language is not None:
                raise ValueError(
                    "pathways with aggregation='sum' steps on all languages: pass language=None"
                )
            if self._grad_sum is None:
                raise RuntimeError("aggregation='sum': call accumulate_grads(language) after each backward")
            with torch.no_grad():
                for name, p in self.params.items():
                    if p.grad is not None and bool(p.grad.any()):
                        # A gradient that bypassed accumulate_grads would be silently dropped.
                        raise RuntimeError(
                            f"{name} has a gradient not passed through accumulate_grads(language)"
                        )
                    total = self._grad_sum.get(name)
                    p.grad = None if total is None else total
            self._grad_sum = None
            return
        assert self._lang_masks is not None
        mask = self._lang_masks[self._lang(language)]
        mask.mask_grads_(self.params)
        with torch.no_grad():
            self._frozen = {}
            for name, p in self.params.items():
                outside = ~mask[name].to(p.device)
                self._frozen[name] = (outside, p[outside].clone())

    def _pathways_after_step(self) -> None:
        self._require_pathway_masks()
        if self._frozen is not None:
            with torch.no_grad():
                for name, (outside, values) in self._frozen.items():
                    self.params[name][outside] = values
            self._frozen = None
        else:
            assert self._union is not None
            self._union.apply_(self.params)  # no gradient there, but keep it exact (e.g. AdamW)

    # ---- masks
    def masks(self, language: str | None = None) -> MaskSet:
        """The current mask (dynamic pathways: of ``language``, required). Live object: do not modify."""
        self._require_prepared()
        if self.multilingual:
            if language is None:
                raise ValueError("dynamic-pathways masks are per language: pass language=")
            assert self._lang_masks is not None
            return self._lang_masks[language]
        assert self._mask is not None
        return self._mask

    def language_masks(self) -> LanguageMasks:
        """Dynamic pathways: all languages' masks (live object)."""
        self._require_prepared()
        if self._lang_masks is None:
            raise ValueError(f"method {self.config.method} has one mask, not per-language masks")
        return self._lang_masks

    def _lang(self, language: str | None) -> str:
        if language is None or language not in self.languages:
            raise ValueError(f"{self.config.method} needs a language in {self.languages}, got {language!r}")
        return language

    # ---- training hooks
    @contextmanager
    def masked_forward(self, language: str | None = None) -> Iterator[None]:
        """Soft methods: ``param.data = theta ⊙ m`` for the forward+backward inside, dense theta
        restored on exit (straight-through gradient). Hard methods: no-op, except pathways: the same
        substitution with ``m_language`` (its gradients are then masked by ``m_language``)."""
        if self.pathways:
            self._require_pathway_masks()  # hard, but each language sees only its own pathway
        self._require_prepared()
        if not self.pathways and not self.config.soft:
            yield
            return
        lang = self._lang(language) if self.multilingual else None
        mask = self.masks(lang)
        if self._swap is None:
            with mask.substituted(self.params):
                yield
            return
        packed = self._packed_rows(lang, mask)
        for name, layer in self._swap.layers.items():
            layer.set_mask(packed[name], hard=self.pathways)
        rest = MaskSet({n: m for n, m in mask.items() if n not in self._swap.layers}) if len(
            self._swap.layers) < len(self.params) else None
        try:
            if rest is not None:  # in-scope weights outside nn.Linear layers
                with rest.substituted(self.params):
                    yield
            else:
                yield
        finally:
            self._swap.clear_masks()

    def _packed_rows(self, language: str | None, mask: MaskSet) -> dict[str, Tensor]:
        """Row-packed bit masks of the swapped layers (cached until the mask object changes)."""
        from ..kernels.masked_linear import pack_rows

        assert self._swap is not None
        cached = self._packed.get(language)
        if cached is not None and cached[0] is mask:
            return cached[1]
        packed = {name: pack_rows(mask[name].to(self.params[name].device)) for name in self._swap.layers}
        self._packed[language] = (mask, packed)
        return packed

    def close(self) -> None:
        """Undo the layer swap of the triton backend (the model is an ordinary model again)."""
        if self._swap is not None:
            self._swap.restore()
            self._swap = None
        self._packed.clear()

    def before_optimizer_step(self, step: int, language: str | None = None) -> None:
        """Hard: zero the pruned weights' gradients. Adaptive: nothing. Dynamic pathways: zero the
        gradients outside ``language``'s selectable zone and snapshot those weights. Pathways: see
        the module docstring (``"alternate"``: ``m_language``; ``"sum"``: language None)."""
        if self.pathways:
            self._pathways_before_step(language)
            return
        self._require_prepared()
        if not self.config.soft:
            self.masks().mask_grads_(self.params)
            return
        if not self.multilingual:
            return
        assert self._lang_masks is not None
        lang = self._lang(language)
        zone = self._lang_masks.selectable_zone(lang)
        zone.mask_grads_(self.params)
        with torch.no_grad():
            self._frozen = {}
            for name, p in self.params.items():
                outside = ~zone[name].to(p.device)
                self._frozen[name] = (outside, p[outside].clone())

    def after_optimizer_step(self, step: int) -> None:
        """Hard: re-zero pruned weights. Dynamic pathways: restore the weights outside the zone.
        Pathways: restore the weights outside ``m_language`` (alternate) or re-zero those outside
        the union (sum)."""
        if self.pathways:
            self._pathways_after_step()
            return
        self._require_prepared()
        if not self.config.soft:
            self.masks().apply_(self.params)
            return
        if self._frozen is not None:
            with torch.no_grad():
                for name, (outside, values) in self._frozen.items():
                    self.params[name][outside] = values
            self._frozen = None

    def update_mask(self, step: int, language: str | None = None) -> bool:
        """Update masks after ``step`` completed optimizer steps (see module docstring).

        Returns True if any mask changed.
        """
        self._require_prepared()
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if self.pathways:
            self._require_pathway_masks()
            return False  # stage-2 masks are fixed
        if step == 0:
            return False
        if self.schedule.is_prune_step(step):
            return self._level_event(step)
        if not self.config.soft or self.level <= 0:
            return False
        if self.multilingual:
            if language is not None:
                self._lang(language)  # checked on every step: a typo should not pass silently
            if step % self.config.adapt_every == 0:
                self._rerank_due = set(self.languages)  # a new window: every language is due
            due = [lang for lang in self.languages if lang in self._rerank_due and language in (None, lang)]
            if not due:
                return False
            self._rerank_due -= set(due)
            changed = self._rerank_languages(step, "rerank", due)
            self._zero_unused()
            return changed
        if step % self.config.adapt_every == 0:  # one mask: zeroing is fused into the re-rank
            return self._rerank_single(step, "rerank", candidates=None, apply=True)
        return False

    def _zero_unused(self) -> None:
        """Soft pruning sets pruned weights to zero at every mask update; they stay trainable and
        regrow from zero. Per-language masks: only weights no language keeps are zeroed, so a
        language never zeroes a weight another one owns."""
        keep = self._lang_masks.union() if self._lang_masks is not None else self._mask
        assert keep is not None
        keep.apply_(self.params)

    # ---- mask updates
    def _weights(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def _rank(self, candidates: dict[str, Tensor] | None, apply: bool = False) -> MaskSet:
        """The masks at the current level; ``apply``: also zero the weights they prune (the
        triton backend does it in the same launches as the masks)."""
        g = self.config.granularity
        if self.backend == "triton":
            from ..kernels.rerank import rerank_masks

            try:
                masks = rerank_masks(
                    self._weights(), self.level, kind=g.kind, n=g.n, m=g.m, block=g.block,
                    scope=self.config.ranking, candidates=candidates, backend="triton",
                    algorithm=self.config.rerank_algorithm, apply=apply,
                )
            except ValueError as e:
                raise UserError(f"pruning: {e}") from None
            return MaskSet(masks)
        mask = MaskSet(
            magnitude_masks(self._weights(), self.level, g, scope=self.config.ranking, candidates=candidates)
        )
        if apply:
            mask.apply_(self.params)
        return mask

    def _record(self, step: int, event: str, old: MaskSet, new: MaskSet, language: str | None) -> bool:
        entry: dict[str, Any] = {
            "step": step, "event": event, "level": self.level,
            "sparsity": new.sparsity(), "churn": new.churn(old),
        }
        if language is not None:
            entry["language"] = language
        self.history.append(entry)
        return new.flips(old) > 0

    def _rerank_single(self, step: int, event: str, candidates: dict[str, Tensor] | None, apply: bool = False) -> bool:
        assert self._mask is not None
        old = self._mask
        self._mask = self._rank(candidates, apply=apply)
        return self._record(step, event, old, self._mask, None)

    def _rerank_languages(self, step: int, event: str, languages: list[str] | None = None) -> bool:
        """``languages`` (default: all) re-ranked inside their selectable zones, all zones taken
        from the masks as they were before this event (the order of the languages does not matter)."""
        before = self._lang_masks
        assert before is not None
        chosen = self.languages if languages is None else languages
        new = {lang: self._rank(before.selectable_zone(lang).as_dict()) if lang in chosen else before[lang]
               for lang in self.languages}
        self._lang_masks = LanguageMasks(new)
        return any([self._record(step, event, before[lang], new[lang], lang) for lang in chosen])

    def _rewind_all(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.theta0[name])

    def _level_event(self, step: int) -> bool:
        """Sparsity step: prune to ``schedule.sparsity_at(step)``."""
        self.level = self.schedule.sparsity_at(step)
        lth = self.config.method == "lth" or (self.config.soft and self.config.variant == "lth")
        if not self.config.soft:
            assert self._mask is not None
            # Rank only among kept weights: masks are nested and pruned zeros never come back.
            # LTH zeroes after the rewind; otherwise the zeroing is fused into the ranking.
            changed = self._rerank_single(step, "level", candidates=self._mask.as_dict(), apply=not lth)
            assert self._mask is not None
            if lth:
                self._rewind_all()
                self._mask.apply_(self.params)
            return changed
        if self.multilingual:
            changed = self._rerank_languages(step, "level")  # language-agnostic: all at once
            self._rerank_due = set()  # they were all just ranked at the new level
        else:
            changed = self._rerank_single(step, "level", candidates=None, apply=not lth)
        if lth:
            self._rewind_all()  # after ranking on the trained weights
        if lth or self.multilingual:
            self._zero_unused()
        return changed

    # ---- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"meta": {...JSON-able...}, "tensors": {key: Tensor}}``; see the module docstring."""
        if self.pathways:
            self._require_pathway_masks()
        self._require_prepared()
        tensors: dict[str, Tensor] = {}
        sets = (
            {f"{lang}/": ms for lang, ms in self._lang_masks.items()} if self._lang_masks is not None
            else {"": self.masks()}
        )
        for prefix, ms in sets.items():
            packed, _ = ms.pack()
            tensors.update({f"mask/{prefix}{n}": t.cpu() for n, t in packed.items()})
        tensors.update({f"theta0/{n}": t.detach().cpu().clone() for n, t in self.theta0.items()})
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": self.config.method,
            "level": self.level,
            "languages": list(self.languages),
            "shapes": {n: list(p.shape) for n, p in self.params.items()},
            "history": [dict(h) for h in self.history],
            "rerank_due": sorted(self._rerank_due),
        }
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (model weights are not touched)."""
        try:
            meta, tensors = state["meta"], state["tensors"]
            if meta["format"] != STATE_FORMAT or meta["version"] != STATE_VERSION:
                raise ValueError(f"not a pruner state ({meta.get('format')!r} v{meta.get('version')!r})")
            if meta["method"] != self.config.method:
                raise ValueError(f"state is for method {meta['method']!r}, config says {self.config.method!r}")
            shapes = {n: list(p.shape) for n, p in self.params.items()}
            if meta["shapes"] != shapes:
                raise ValueError("pruning scope differs from the one saved")
            if list(meta["languages"]) != self.languages:
                raise ValueError(f"languages {meta['languages']} differ from {self.languages}")

            def unpack(prefix: str) -> MaskSet:
                return self._on_weights(MaskSet.unpack({n: tensors[f"mask/{prefix}{n}"] for n in shapes}, shapes))

            theta0 = {
                n: tensors[f"theta0/{n}"].to(device=p.device, dtype=p.dtype).clone()
                for n, p in self.params.items()
            }
            if any(list(t.shape) != shapes[n] for n, t in theta0.items()):
                raise ValueError("theta0 shapes differ from the scope")
            if self.multilingual:
                self._lang_masks = LanguageMasks({lang: unpack(f"{lang}/") for lang in self.languages})
            else:
                self._mask = unpack("")
            level = float(meta["level"])
            if not math.isfinite(level):
                raise ValueError(f"bad level {level}")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"cannot restore pruner state: {exc}") from None
        self.theta0 = theta0
        self.level = level
        self.history = [dict(h) for h in meta["history"]]
        due = meta.get("rerank_due", [])  # absent before the per-language rule: nothing pending
        self._rerank_due = {lang for lang in due if lang in self.languages} if isinstance(due, list) else set()
        self._frozen = None
        if self.pathways:
            self._set_pathways_ready()
