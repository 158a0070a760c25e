"""Direct launches of compiled Triton kernels: what a repeated call costs the host.

Triton's launch path (``Autotuner.run``, then ``JITFunction.run``) rebuilds the autotuning key,
binds and specializes every argument and hashes the result on every call. On the CPU machine,
with only the final C launch stubbed out, that measured 28 µs in ``JITFunction.run`` alone and
46 µs with the autotuner in front, per launch of the masked-linear forward. cuBLAS's forward at
the ``base`` shape took 21 µs on the H100, whose rows there were host-bound.

:class:`DirectLauncher` wraps one kernel. The first call with a given launch signature goes
through Triton (autotuning, compiling), and the launcher keeps the compiled kernel Triton returned
and the meta-parameters it chose. Later calls with the same signature pass the arguments straight
to that compiled kernel's launcher. The signature holds everything Triton's choice depends on:

- the device;
- each tensor argument's dtype, and whether its address is 16-byte aligned;
- each int argument named in the autotuner's key, by value; any other int by the classes Triton
  specializes on: equal to 1, divisible by 16, fits in int32, fits in int64;
- floats by type (Triton compiles any float argument as fp32); any other argument (None, a
  bool) by value;
- the constexpr keywords, by name and value.

So a training run whose token count changes every batch still reuses one entry per autotuning
bucket and alignment class. What the direct path skips, and why that is safe here:

- Triton's check that the kernel's global variables have not changed since it compiled: the
  kernels of this package read only module constants;
- launch hooks (profilers such as proton): while one is installed every call takes Triton's path,
  and otherwise the direct path hands the launcher no hooks and no launch metadata;
- ``knobs.runtime.debug`` toggled after a kernel was cached keeps the cached kernel.

Under ``TRITON_INTERPRET=1`` there is nothing compiled to keep, and every call goes to Triton.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor
from triton import knobs
from triton.runtime import driver

__all__ = ["DirectLauncher", "package_launchers", "triton_launches"]

log = logging.getLogger(__name__)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_I32 = (-(1 << 31), (1 << 31) - 1)
_I64 = (-(1 << 63), (1 << 63) - 1)

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


def _int_class(v: int) -> int:
    """What Triton's specialization of an int argument depends on: 1 for the value 1, otherwise
    2 plus bits for "divisible by 16", "fits in int32" and "needs uint64"."""
    if v == 1:
        return 1
    return 2 + (v & 15 == 0) + 2 * (_I32[0] <= v <= _I32[1]) + 4 * (v > _I64[1])


def _hooked(hook: Any) -> bool:
    # Triton 3.6 keeps its launch hooks in (normally empty) HookChains; a user may also set one.
    return hook is not None and bool(getattr(hook, "calls", True))


class DirectLauncher:
    """``launcher[grid](*args, **constexprs)``: launch ``kernel`` (a ``triton.jit`` function, or an
    autotuner over one) as ``kernel[grid](*args, **constexprs)`` would, through Triton on the
    first call of each launch signature and directly afterwards (module doc).

    ``args`` are the kernel's runtime arguments in order, positionally, and ``constexprs`` its
    remaining parameters by name (less those the autotuner's config sets) and launch options such
    as ``num_warps``. A call that passes a runtime argument by keyword, or leaves a parameter to
    its default, turns the launcher off (logged once): Triton's path from then on.
    ``enabled=False`` sends every call through Triton (benchmarks compare the two); ``hits`` and
    ``misses`` count the calls that did and did not take the direct path.
    """

    def __init__(self, kernel: Any, *, max_entries: int = 4096) -> None:
        from triton.runtime.autotuner import Autotuner, Heuristics

        jit = kernel
        while isinstance(jit, (Autotuner, Heuristics)):
            jit = jit.fn
        self.kernel = kernel
        self.name: str = jit.fn.__name__
        # A JITFunction, or under the interpreter an InterpretedFunction (no params: never cached).
        self._names: list[str] = list(jit.arg_names)
        self._runtime = frozenset(p.name for p in getattr(jit, "params", ()) if not p.is_constexpr)
        keyed = set(kernel.keys) if isinstance(kernel, Autotuner) else set()
        self._exact = frozenset(i for i, name in enumerate(self._names) if name in keyed)
        self._autotuned = isinstance(kernel, Autotuner)
        # A config's pre-hook runs before every launch: only Triton's path calls it.
        hooked = self._autotuned and any(c.pre_hook is not None for c in kernel.configs)
        self._cache: dict[tuple, tuple[Any, tuple, dict[str, Any]]] = {}
        self._max_entries = max_entries
        self.enabled = not _INTERPRET and not hooked
        self.hits = 0
        self.misses = 0

    def signature(self, args: tuple) -> tuple:
        """The part of the cache key that ``args`` make (module doc)."""
        exact = self._exact
        out: list[object] = []
        add = out.append
        for i, a in enumerate(args):
            t = type(a)
            if t is int:
                add(a if i in exact else _int_class(a))
            elif a is None:
                add(None)
            elif isinstance(a, Tensor):
                add((a.dtype, a.data_ptr() & 15 == 0))
            elif t is float:  # Triton passes any float as fp32: its value changes nothing compiled
                add(float)
            else:  # bools (type(True) is bool, not int), strings: by value
                add((t, a))
        return tuple(out)

    def __getitem__(self, grid: Grid) -> Callable[..., None]:
        return functools.partial(self.launch, grid)

    def launch(self, grid: Grid, *args: Any, **constexprs: Any) -> None:
        """``kernel[grid](*args, **constexprs)``, directly when this signature was seen before."""
        if not self.enabled or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            self.kernel[grid](*args, **constexprs)
            return
        device = driver.active.get_current_device()
        key = (device, self.signature(args), tuple(constexprs.items()))
        entry = self._cache.get(key)
        if entry is None:
            self.misses += 1
            compiled = self.kernel[grid](*args, **constexprs)
            self._remember(key, compiled, len(args), constexprs)
            return
        self.hits += 1
        compiled, tail, meta = entry
        g = grid(meta) if callable(grid) else grid
        stream = driver.active.get_current_stream(device)
        compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)

    def _remember(self, key: tuple, compiled: Any, n_args: int, constexprs: dict[str, Any]) -> None:
        if hasattr(compiled, "result"):  # Triton's asynchronous compile mode hands back a future
            compiled = compiled.result()
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return  # nothing compiled (the interpreter): keep taking Triton's path
        meta = dict(constexprs)
        if self._autotuned:
            meta.update(self.kernel.best_config.kwargs)
        # A runtime argument passed by keyword would key the cache by its value, and a parameter
        # left to its default has no value here: the call site's doing, so every later call of
        # this launcher takes Triton's path rather than building a key it cannot use.
        why = "a runtime argument by keyword" if self._runtime & constexprs.keys() else next(
            (f"parameter {name} left to its default" for name in self._names[n_args:] if name not in meta), None)
        if why is not None:
            self.enabled = False
            log.warning("%s: %s, so it launches through Triton every time", self, why)
            return
        tail = tuple(meta[name] for name in self._names[n_args:])
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        self._cache[key] = (compiled, tail, meta)

    def __repr__(self) -> str:
        return f"DirectLauncher({self.name})"

    def clear(self) -> None:
        """Forget every cached launch (the next call of each signature goes through Triton)."""
        self._cache.clear()


# The modules whose kernels launch through a DirectLauncher (a test keeps this list complete).
_MODULES = ("masked_linear.fused", "masked_linear.cast", "rerank.select", "rerank.window", "small_row.bitmap",
            "small_row.bsr")


def package_launchers() -> list[DirectLauncher]:
    """Every :class:`DirectLauncher` of this package's kernel modules."""
    import importlib

    out: list[DirectLauncher] = []
    for name in _MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        out += [v for v in vars(module).values() if isinstance(v, DirectLauncher)]
    return out


@contextlib.contextmanager
def triton_launches() -> Iterator[None]:
    """Every launch of the package's kernels takes Triton's own path inside this block (the
    benchmarks time both paths side by side); each launcher's setting is restored after it."""
    launchers = package_launchers()
    before = [lau.enabled for lau in launchers]
    for lau in launchers:
        lau.enabled = False
    try:
        yield
    finally:
        for lau, on in zip(launchers, before, strict=True):
            lau.enabled = on
