"""A Triton driver for machines without a GPU: real compiles and launch paths, no device.

:class:`HostOnlyDriver` stands in for Triton's CUDA driver. Triton compiles for sm_90 as it would
on an H100 (its bundled ptxas needs no driver), binds and specializes the arguments of every launch
and calls the compiled kernel's launcher, and the launcher does nothing: it counts the launch, and
records it when asked. So on the CPU machine the host side of a launch is real Python and the
device side is absent, which is what ``benchmarks/host_launch.py`` times and what
``tests/kernels/launch_check.py`` compares (``kernels/launch.py`` against Triton's own path).

The launcher skips what the real one does in C: reading each tensor's address and the driver's
``cuLaunchKernelEx`` (a few µs per launch on a GPU host).

Tensors stay on the CPU: nothing reads or writes them. Install with :meth:`HostOnlyDriver.install`
before the first launch of the process, and never under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The one device property a launch reads (compiler.max_shared_mem): sm_90's shared memory per block.
SM90_PROPERTIES = {"max_shared_mem": 232448}


@dataclass(frozen=True)
class Launch:
    """One launch as the launcher received it."""

    grid: tuple[int, int, int]
    function: int  # the compiled kernel's handle (one per compiled kernel)
    packed_metadata: Any
    args: tuple[Any, ...]


class _Utils:
    def __init__(self) -> None:
        self._handles = itertools.count(1)
        self.names: dict[int, str] = {}  # function handle -> kernel name

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        handle = next(self._handles)
        self.names[handle] = name
        return 0, handle, 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device: int) -> dict[str, int]:
        return dict(SM90_PROPERTIES)


class HostOnlyDriver:
    """Triton's CUDA driver less the device (module doc). ``launches`` counts the launches;
    with ``record`` set, ``recorded`` lists them."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launches = 0
        self.record = False
        self.recorded: list[Launch] = []

    def launcher_cls(self, src: Any, metadata: Any) -> Callable[..., None]:
        def launch(gx: int, gy: int, gz: int, stream: int, function: int, packed_metadata: Any,
                   launch_metadata: Any, enter_hook: Any, exit_hook: Any, *args: Any) -> None:
            self.launches += 1
            if self.record:
                self.recorded.append(Launch((gx, gy, gz), function, packed_metadata, args))

        return launch

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")

    def get_benchmarker(self) -> Callable[..., Any]:
        return lambda fn, quantiles=None, **kw: [1.0] * len(quantiles) if quantiles else 1.0

    @classmethod
    def install(cls) -> HostOnlyDriver:
        """Make a new driver Triton's active one and return it."""
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("HostOnlyDriver needs compiled kernels: unset TRITON_INTERPRET")
        from triton.runtime import driver as config

        drv = cls()
        config.set_active(drv)
        return drv


def single_config() -> None:
    """Keep one config of each autotuned kernel of the package, the one with the smallest tiles
    (the product of its ``BLOCK*`` values), so that nothing is benchmarked (there is no device to
    time it on), one config is compiled instead of all of them, and it fits any shape's shared
    memory. For this process's host measurements and checks only."""
    from sparse_rnnt.kernels.launch import package_launchers

    def area(config: Any) -> int:
        return math.prod(v for name, v in config.kwargs.items() if name.startswith("BLOCK"))

    for kernel in {id(lau.kernel): lau.kernel for lau in package_launchers() if hasattr(lau.kernel, "configs")}.values():
        kernel.configs = [min(kernel.configs, key=area)]
