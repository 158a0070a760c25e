"""Which parameters are pruned: the weight matrices of chosen layer types under chosen sub-modules.

The default scope (``ScopeConfig()``) is the weight matrix of every ``Linear`` layer (and the
``weight_*`` matrices of every ``torch.nn.LSTM``, if any) in the encoder (``rnnt.transcriber``),
predictor (``rnnt.predictor``) and joiner (``rnnt.joiner``) of an :class:`EmformerRNNT`. Biases,
norms, the symbol embedding and the auxiliary CTC head are not in it.

torchaudio's predictor LSTM is a ``_CustomLSTM`` built from two bias-free ``Linear`` layers
(``x2g``: input -> gates, ``p2g``: previous output -> gates), so ``"Linear"`` covers it.

For the ``tiny`` model with 40 symbols the default scope is these 26 tensors (1,209,152 weights of
1,226,024 parameters), in ``named_parameters()`` order::

    rnnt.transcriber.input_linear.weight                                   [36, 80]
    rnnt.transcriber.transformer.emformer_layers.{i}.attention.emb_to_key_value.weight  [288, 144]
    rnnt.transcriber.transformer.emformer_layers.{i}.attention.emb_to_query.weight      [144, 144]
    rnnt.transcriber.transformer.emformer_layers.{i}.attention.out_proj.weight          [144, 144]
    rnnt.transcriber.transformer.emformer_layers.{i}.pos_ff.1.weight                    [576, 144]
    rnnt.transcriber.transformer.emformer_layers.{i}.pos_ff.4.weight                    [144, 576]
        (the five above for each layer i = 0..3)
    rnnt.transcriber.output_linear.weight                                  [256, 144]
    rnnt.predictor.lstm_layers.0.x2g.weight                                [512, 128]
    rnnt.predictor.lstm_layers.0.p2g.weight                                [512, 128]
    rnnt.predictor.linear.weight                                           [256, 128]
    rnnt.joiner.linear.weight                                              [40, 256]
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..errors import UserError

DEFAULT_ROOTS: tuple[str, ...] = ("rnnt.transcriber", "rnnt.predictor", "rnnt.joiner")


@dataclass(frozen=True)
class ScopeConfig:
    """Which parameters are in the pruning scope.

    - ``module_types``: class names; a module matches when its class or any base class has one of
      these names (so ``"Linear"`` also covers subclasses of ``nn.Linear``, e.g. a masked Linear).
      From a matching module only its own weight matrices are taken: the parameter named
      ``weight`` or ``weight_*`` (LSTM's ``weight_ih_l0``, ``weight_hh_l0``, ``weight_hr_l0``...)
      with at least 2 dimensions. Biases and 1-D weights (norms) are never selected.
    - ``roots``: module-name prefixes the layers must live under (a root matches itself and its
      descendants); ``()`` means the whole model. Every root must name a module of the model.
    - ``include``: ``fnmatch`` patterns on full parameter names; if non-empty a parameter must match
      at least one. ``exclude``: a parameter matching any of these is dropped (after ``include``).
    - ``min_size``: parameters with fewer elements are dropped.
    """

    module_types: tuple[str, ...] = ("Linear", "LSTM")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 0
    roots: tuple[str, ...] = DEFAULT_ROOTS

    def __post_init__(self) -> None:
        # Configs read from YAML/JSON bring lists; keep the dataclass hashable and immutable.
        for key in ("module_types", "include", "exclude", "roots"):
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, tuple(value))

    def validate(self) -> None:
        """Raise :class:`UserError` on a malformed value."""
        for key in ("module_types", "include", "exclude", "roots"):
            value = getattr(self, key)
            if isinstance(value, str) or not isinstance(value, tuple):
                raise UserError(f"pruning.scope.{key} must be a list of strings, got {value!r}")
            for item in value:
                if not isinstance(item, str) or not item:
                    raise UserError(f"pruning.scope.{key} must hold non-empty strings, got {item!r}")
        if not self.module_types:
            raise UserError("pruning.scope.module_types must name at least one layer type")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise UserError(f"pruning.scope.min_size must be an integer >= 0, got {self.min_size!r}")


def _type_matches(module: nn.Module, names: tuple[str, ...]) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return not roots or any(name == r or name.startswith(r + ".") for r in roots)


def _is_weight_matrix(param_name: str, param: nn.Parameter) -> bool:
    return (param_name == "weight" or param_name.startswith("weight_")) and param.dim() >= 2


def select_parameters(model: nn.Module, config: ScopeConfig | None = None) -> dict[str, nn.Parameter]:
    """The in-scope parameters of ``model``, by full name, in ``model.named_parameters()`` order.

    A parameter shared by several modules appears once, under the name ``named_parameters()``
    gives it. Raises :class:`UserError` if the config is invalid, a root is not a module of the
    model, or nothing is selected.
    """
    config = ScopeConfig() if config is None else config
    config.validate()
    modules = dict(model.named_modules())
    missing = [r for r in config.roots if r not in modules]
    if missing:
        raise UserError(
            f"pruning.scope.roots: {', '.join(map(repr, missing))} not a module of "
            f"{type(model).__name__} (set roots to [] for the whole model)"
        )
    chosen: set[int] = set()
    for mod_name, module in modules.items():
        if not _under(mod_name, config.roots) or not _type_matches(module, config.module_types):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            if _is_weight_matrix(p_name, param):
                chosen.add(id(param))
    selected: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if id(param) not in chosen:
            continue
        if config.include and not any(fnmatch.fnmatchcase(name, pat) for pat in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in config.exclude):
            continue
        if param.numel() < config.min_size:
            continue
        selected[name] = param
    if not selected:
        raise UserError(
            f"pruning scope is empty: no weight matrix of {list(config.module_types)} under "
            f"{list(config.roots) or 'the model'} matches include={list(config.include)}, "
            f"exclude={list(config.exclude)}, min_size={config.min_size}"
        )
    return selected
