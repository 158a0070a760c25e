"""Typed, validated experiment configs: YAML <-> nested dataclasses, ``key=value`` overrides.

Unknown keys are errors (with a suggestion), values are converted to the field's type, and the
resolved config is saved with the experiment so a run can be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .checks import MAX_SEED, MAX_THREADS, is_device_spec, is_finite_number, is_int
from .data.features import FeatureConfig, SpecAugmentConfig
from .data.sampler import BatchConfig
from .data.tokenizer import TokenizerConfig
from .errors import UserError
from .io import atomic_write_text
from .model.configs import MODEL_SIZES, ModelConfig
from .pruning.methods import PruningConfig

log = logging.getLogger(__name__)
T = TypeVar("T")





_Check = tuple[typing.Callable[[Any], bool], str]
_POSITIVE_INT: _Check = (lambda v: is_int(v) and v > 0, "positive (an integer > 0)")
_COUNT: _Check = (lambda v: is_int(v) and v >= 0, "an integer >= 0")
_SEED: _Check = (lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
_POSITIVE: _Check = (lambda v: is_finite_number(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE: _Check = (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0")
_FRACTION: _Check = (lambda v: is_finite_number(v) and 0 <= v <= 1, "a fraction in [0, 1]")
_UNIT_OPEN: _Check = (lambda v: is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)")
_COVERAGE: _Check = (lambda v: is_finite_number(v) and 0 < v <= 1, "a number in (0, 1]")
_THREADS: _Check = (lambda v: is_int(v) and 0 <= v <= MAX_THREADS, f"an integer in [0, {MAX_THREADS}]")


@dataclass(frozen=True)
class DataConfig:
    manifest_dir: str = ""  # directory with train.jsonl / dev.jsonl / test.jsonl
    languages: tuple[str, ...] = ()  # empty = every language in the training manifest
    tokenizer: str = ""  # existing sentencepiece model; empty = train one into the run directory
    cache_features: bool = True  # compute log-mel once and keep it in memory
    max_duration: float = 30.0  # seconds; longer training utterances are skipped (and counted)
    dev_max_utterances: int = 200  # per language, for periodic dev evaluation
    workers: int = 0  # feature extraction processes; 0 = all cores
    max_bad_fraction: float = 0.05  # stop if more of the training items are bad (see data_report.json)
    clip_fraction: float = 0.01  # audio with more samples at full scale counts as clipped


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1.5e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 200
    # after warmup: "constant", "cosine" (reaching min_lr_ratio * lr after the last step) or "inverse_sqrt"
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0  # max global gradient norm; 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 2000
    log_every: int = 10
    eval_every: int = 500  # dev evaluation (greedy WER); 0 = only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    tf32: bool = False  # float32 matmuls (cuBLAS and the masked kernels) on TF32 tensor cores, CUDA only
    threads: int = 0  # torch intra-op threads on CPU; 0 = all cores
    max_nonfinite_steps: int = 5  # NaN/Inf losses in a row (each step skipped) before the run stops
    progress: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig | None = None  # None = dense training

    def validate(self) -> None:
        self.model.validate()
        _check_model_name(self.model)
        if self.pruning is not None:
            self.pruning.validate()
            method = self.pruning.method
            if method in ("dynamic-pathways", "pathways") and self.batch.mode != "monolingual":
                raise UserError(
                    f"pruning.method {method} trains each language on its own batches: it needs "
                    f"batch.mode=monolingual, got batch.mode={self.batch.mode!r}"
                )
            if method == "lap" and self.batch.mode != "mixed":
                raise UserError(
                    "pruning.method lap finds one language-agnostic mask on mixed multilingual batches: "
                    f"it needs batch.mode=mixed, got batch.mode={self.batch.mode!r}"
                )
            if method == "pathways" and not self.pruning.init_masks.strip():
                raise UserError(
                    "pruning.method pathways needs the stage-1 per-language masks: set "
                    "pruning.init_masks (--init-masks en=RUN_EN,fr=RUN_FR,...) to per-language IMP/LTH runs"
                )
        o, t = self.optim, self.train
        if o.schedule not in ("constant", "cosine", "inverse_sqrt"):
            raise UserError(f"optim.schedule must be constant, cosine or inverse_sqrt, got {o.schedule!r}")
        if t.amp not in ("auto", "bf16", "off"):
            raise UserError(f"train.amp must be auto, bf16 or off, got {t.amp!r}")
        if not is_device_spec(t.device):
            raise UserError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
        # Every number, before the sub-configs' own checks (which may do arithmetic on them).
        for key, value, (ok, what) in self._numeric_checks():
            if not ok(value):
                raise UserError(f"{key} must be {what}, got {value!r}")
        seen: set[str] = set()
        for lang in self.data.languages:  # a repeat would get two samplers' share of batches
            if not isinstance(lang, str) or not lang.strip():
                raise UserError(f"data.languages must be language codes, got {lang!r}")
            if lang in seen:
                raise UserError(f"data.languages lists {lang!r} more than once")
            seen.add(lang)
        if self.features.n_mels != self.model.input_dim:
            # The encoder's first layer reads one log-mel vector per frame.
            raise UserError(
                f"features.n_mels ({self.features.n_mels}) must equal model.input_dim ({self.model.input_dim}): "
                "the model reads one log-mel vector per frame; set both to the same value"
            )
        for sub in (self.features, self.spec_augment, self.tokenizer, self.batch):
            validate = getattr(sub, "validate", None)
            if validate is not None:
                try:
                    validate()
                except (ValueError, TypeError) as e:
                    raise UserError(f"{type(sub).__name__}: {e}") from None

    def _numeric_checks(self) -> list[tuple[str, Any, _Check]]:
        """``(key, value, (predicate, what it must be))`` for the numbers of every section: NaN and
        infinity, negative counts and out-of-range probabilities pass plain ``<``/``>`` checks and
        then crash deep inside training (the pruning section checks its own)."""
        d, o, t = self.data, self.optim, self.train
        if not isinstance(o.betas, tuple) or len(o.betas) != 2:
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")
        f, sa, tok, m, b = self.features, self.spec_augment, self.tokenizer, self.model, self.batch
        checks: list[tuple[str, Any, _Check]] = [
            ("data.max_duration", d.max_duration, _POSITIVE),
            ("data.dev_max_utterances", d.dev_max_utterances, _COUNT),
            ("data.workers", d.workers, _THREADS),
            ("data.max_bad_fraction", d.max_bad_fraction, _FRACTION),
            ("data.clip_fraction", d.clip_fraction, _FRACTION),
            ("optim.lr", o.lr, _POSITIVE),
            *((f"optim.betas[{i}]", beta, _UNIT_OPEN) for i, beta in enumerate(o.betas)),
            ("optim.eps", o.eps, _POSITIVE),
            ("optim.weight_decay", o.weight_decay, _NON_NEGATIVE),
            ("optim.warmup_steps", o.warmup_steps, _COUNT),
            ("optim.min_lr_ratio", o.min_lr_ratio, _FRACTION),
            ("optim.grad_clip", o.grad_clip, _NON_NEGATIVE),
            ("train.max_steps", t.max_steps, _POSITIVE_INT),
            ("train.log_every", t.log_every, _COUNT),
            ("train.eval_every", t.eval_every, _COUNT),
            ("train.checkpoint_every", t.checkpoint_every, _COUNT),
            ("train.keep_checkpoints", t.keep_checkpoints, _POSITIVE_INT),
            ("train.seed", t.seed, _SEED),
            ("train.threads", t.threads, _THREADS),
            ("train.max_nonfinite_steps", t.max_nonfinite_steps, _COUNT),
            ("features.sample_rate", f.sample_rate, _POSITIVE_INT),
            ("features.n_mels", f.n_mels, _POSITIVE_INT),
            ("features.win_ms", f.win_ms, _POSITIVE),
            ("features.hop_ms", f.hop_ms, _POSITIVE),
            ("features.n_fft", f.n_fft, _POSITIVE_INT),
            ("features.f_min", f.f_min, _NON_NEGATIVE),
            ("features.log_floor", f.log_floor, _POSITIVE),
            ("spec_augment.freq_masks", sa.freq_masks, _COUNT),
            ("spec_augment.freq_width", sa.freq_width, _COUNT),
            ("spec_augment.time_masks", sa.time_masks, _COUNT),
            ("spec_augment.time_width_ratio", sa.time_width_ratio, _FRACTION),
            ("spec_augment.p", sa.p, _FRACTION),
            ("tokenizer.vocab_size", tok.vocab_size, _COUNT),
            ("tokenizer.character_coverage", tok.character_coverage, _COVERAGE),
            ("tokenizer.seed", tok.seed, _SEED),
            ("model.right_context_length", m.right_context_length, _COUNT),
            ("model.transformer_left_context_length", m.transformer_left_context_length, _COUNT),
            ("model.transformer_max_memory_size", m.transformer_max_memory_size, _COUNT),
            ("model.transformer_dropout", m.transformer_dropout, _UNIT_OPEN),
            ("model.lstm_dropout", m.lstm_dropout, _UNIT_OPEN),
            ("model.lstm_layer_norm_epsilon", m.lstm_layer_norm_epsilon, _POSITIVE),
            ("model.ctc_weight", m.ctc_weight, _NON_NEGATIVE),
            ("batch.max_frames", b.max_frames, _POSITIVE_INT),
            ("batch.max_batch", b.max_batch, _POSITIVE_INT),
            ("batch.bucket_width_s", b.bucket_width_s, _POSITIVE),
            ("batch.seed", b.seed, _SEED),
        ]
        if f.f_max is not None:
            checks.append(("features.f_max", f.f_max, _POSITIVE))
        return checks


def _shape_fields() -> tuple[str, ...]:
    """The model fields on which the named sizes differ: what a size's name stands for."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "name"
                 and len({getattr(size, f.name) for size in MODEL_SIZES.values()}) > 1)


def _check_model_name(model: ModelConfig) -> None:
    """Warn when the name says one size while the fields are exactly another's: a run made before
    ``--set model.name`` rebased complete model sections trained that other size under this
    label. A warning, not a refusal, so such runs can still be resumed and pruned."""
    for other, size in MODEL_SIZES.items():
        if other != model.name and all(getattr(model, k) == getattr(size, k) for k in _shape_fields()):
            log.warning("model.name is %r but the model's fields are exactly %r's: this is a %r model labelled "
                        "%r (set model.name=%s to say so, or remove the model fields that are not your own "
                        "changes to take %r's)", model.name, other, other, model.name, other, model.name)
            return


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_NO_TEXTS: Mapping[str, str] = types.MappingProxyType({})


def _convert(value: Any, tp: Any, key: str, texts: Mapping[str, str] = _NO_TEXTS) -> Any:
    """``value`` as type ``tp``; ``texts`` maps dotted keys set by ``--set`` to the text typed,
    which str fields (and comma lists) take instead of what YAML made of it (010 -> 8, 1:30 -> 90,
    a # comment cut)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, texts)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.", texts=texts)
    if origin is tuple or origin is list:
        args = typing.get_args(tp)
        if key in texts and not isinstance(value, (list, tuple, dict)):
            value = texts[key]  # a comma list of what was typed
        if isinstance(value, str):
            if value.lstrip().startswith(("[", "{")):  # a quoted YAML list: never split at its commas
                raise UserError(f"{key}: expected a list, got the string {value!r}; write the list unquoted, "
                                "quoting its items instead: ['a', 'b']")
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        out = [_convert(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if is_int(value) and value in (0, 1):  # YAML reads 0 and 1 as integers; '0' and '1' pass below
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if key in texts and not isinstance(value, (list, tuple, dict)):
            return texts[key]
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple, dict)):
            raise UserError(f"{key}: expected a string, got {value!r}")
        # str(8) cannot give back the 010 the file said: refuse rather than store other text.
        raise UserError(f"{key}: expected a string, got {value!r}; quote it (YAML reads unquoted 010, 1_000, "
                        "0.10, 1:30, off or 2024-01-01 as numbers, booleans or dates)")
    raise UserError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", texts: Mapping[str, str] = _NO_TEXTS) -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise :class:`UserError`.
    ``texts``: the typed text of ``--set`` values by dotted key (see :func:`_convert`)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs: dict[str, Any] = {}
    base: Any = None
    if cls is ModelConfig:
        # A named size first, then field overrides on top of it.
        name = _convert(data["name"], str, f"{prefix}name", texts) if "name" in data else "tiny"
        if name not in MODEL_SIZES:
            raise UserError(f"{prefix}name: unknown model size {name!r}: choose from {', '.join(MODEL_SIZES)}")
        base = MODEL_SIZES[name]
    for key, value in data.items():
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}", texts)
    if base is None:
        # A required field (no default), e.g. pruning.method: name it instead of a TypeError.
        missing = [
            f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name not in kwargs and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise UserError(f"missing config key '{prefix}{missing[0]}' (it has no default)")
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (tuples become lists) for YAML and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKey(key, key_node.start_mark.line + 1, first[key])
                    first[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the base class names it
                    pass
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def _yaml_problem(e: Exception, lines: bool = True) -> str:
    """One line: what YAML found and where (its messages span several lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = ""
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if lines else f" at column {mark.column + 1}"
        context = f", {e.context}" if e.context and e.problem else ""
        return f"{e.problem or e.context}{where}{context}"
    return " ".join(str(e).split())


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {part!r} is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = _merge(node[parts[-1]], value)  # a later section merges, as config files do
    else:
        node[parts[-1]] = value


def _leaf_keys(key: str, value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_keys(f"{key}.{k}", v)
    else:
        yield key


def _override_value(item: str, raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        return _load_yaml(raw)
    except _DuplicateKey as e:
        raise UserError(f"--set {item}: duplicate key {e.key!r}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date such as 2024-13-45
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: never the raw text
            raise UserError(f"--set {item}: not valid YAML ({_yaml_problem(e, lines=False)}); quote the items "
                            "YAML reads specially (* & ! % @ ` # :), e.g. ['*joiner*', 'a: b']") from None
        return raw  # plain text YAML cannot read (say *joiner*): the text itself


def _override_text(raw: str, value: Any) -> str:
    """What a str field set to ``raw`` holds: the text typed, or the string a quoted (or tagged)
    YAML scalar stands for."""
    text = raw.strip()
    if isinstance(value, str) and text[:1] in ("'", '"', "!"):
        return value
    return text


def _parse_overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``--set`` items -> (nested dict of YAML values, the typed text of each scalar by dotted key)."""
    tree: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        value = _override_value(item, raw)
        _set_path(tree, key, value)
        for leaf in _leaf_keys(key, value):  # what this item sets no longer holds an earlier text
            for k in [k for k in texts if k == leaf or k.startswith(leaf + ".")]:
                del texts[k]
        if not isinstance(value, (dict, list)):
            texts[key] = _override_text(raw, value)
    return tree, texts


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.languages=en,fr"]`` -> nested dict (values parsed as YAML)."""
    return _parse_overrides(items)[0]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = _load_yaml(p.read_text(encoding="utf-8"))
        except _DuplicateKey as e:
            raise UserError(f"{p}: duplicate key {e.key!r} at line {e.line} (first at line {e.first})") from None
        except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{p}: invalid YAML: {_yaml_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: expected a mapping at the top level")
        tree = loaded
    return config_from_tree(tree, overrides)


def config_from_tree(tree: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Build and validate a config from a nested dict (e.g. a checkpoint's saved config), after
    applying ``key=value`` overrides."""
    over, texts = _parse_overrides(overrides or [])
    tree = _merge(_rebase_model(tree, over, texts), over)
    try:
        cfg = from_dict(ExperimentConfig, tree, texts=texts)
    except (TypeError, ValueError) as e:  # a sub-config's own __post_init__ checks
        raise UserError(f"invalid config: {e}") from None
    cfg.validate()
    return cfg


def _rebase_model(tree: dict[str, Any], over: dict[str, Any], texts: Mapping[str, str]) -> dict[str, Any]:
    """An override of ``model.name`` over a model section that spells out its size's fields (a
    config.yaml written before dump_config kept only the changes, a checkpoint's config) takes
    the new size: the fields equal to the old size's go, the section's own changes stay."""
    new = over.get("model")
    section = tree.get("model")
    if not isinstance(new, dict) or "name" not in new or not isinstance(section, dict):
        return tree
    old = section.get("name", "tiny")
    if not isinstance(old, str) or old not in MODEL_SIZES or texts.get("model.name", new["name"]) == old:
        return tree
    return {**tree, "model": _own_model_fields(section, old)}


def _own_model_fields(section: Mapping[str, Any], size: str) -> dict[str, Any]:
    """The fields of a model section that differ from named ``size``'s (its own changes)."""
    ref = to_dict(MODEL_SIZES[size])
    return {k: v for k, v in section.items() if k != "name" and not (k in ref and v == ref[k])}


def dump_config(cfg: ExperimentConfig) -> str:
    """The config as YAML; the model section is its size's name and the fields that differ from
    that size, so a later ``--set model.name=...`` over the file takes that size's shapes."""
    tree = to_dict(cfg)
    if cfg.model.name in MODEL_SIZES:
        tree["model"] = {"name": cfg.model.name, **_own_model_fields(tree["model"], cfg.model.name)}
    return yaml.safe_dump(tree, sort_keys=False)


def save_config(cfg: ExperimentConfig, path: str | os.PathLike[str]) -> None:
    atomic_write_text(path, dump_config(cfg))
