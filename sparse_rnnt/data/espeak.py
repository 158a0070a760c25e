"""ctypes binding to eSpeak NG (``espeakng-loader`` wheel) for offline speech synthesis.

eSpeak NG keeps its whole state (voice, parameters, output callback) in process-global variables,
so this module allows exactly one :class:`Espeak` per process: construct it once, or call
:meth:`Espeak.shared` to get (or create) the process's instance. A process forked from a parent
that already holds an instance inherits it (synchronous mode starts no threads, so the inherited
library state is valid in the child) and :meth:`Espeak.shared` simply returns it there.

Reproducibility: with a ``seed`` the output of :meth:`Espeak.synthesize` is reproducible for the
same *sequence* of calls in a fresh process, but not call by call: eSpeak NG keeps some
generator state in C function-level statics (pitch-flutter phase and the like) that no API
resets, so an utterance's exact samples depend on what the process synthesized before. Code that
needs bit-exact audio independent of scheduling (``synth.py``) runs each fixed batch of
utterances in a fresh process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

# speak_lib.h constants (stable across eSpeak and eSpeak NG releases).
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() on bad data
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE = 1
ESPEAK_VOLUME = 2
ESPEAK_PITCH = 3
ESPEAK_RANGE = 4
EE_OK = 0
EE_NOT_FOUND = 2

RATE_MIN, RATE_MAX = 80, 450  # words per minute accepted by eSpeak NG
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """eSpeak NG is missing, failed to initialize, or rejected a voice or a text."""


def _paths() -> tuple[Path, Path]:
    """(shared library, espeak-ng-data directory) from the ``espeakng-loader`` wheel."""
    try:
        import espeakng_loader
    except ImportError:
        raise EspeakError(
            "eSpeak NG not available: the Python package 'espeakng-loader' is not installed "
            "(pip install espeakng-loader)"
        ) from None
    lib = Path(espeakng_loader.get_library_path())
    try:
        data = Path(espeakng_loader.get_data_path())
    except RuntimeError as e:
        raise EspeakError(f"eSpeak NG data directory missing: {e}") from None
    if not lib.is_file():
        raise EspeakError(f"eSpeak NG shared library not found at {lib}")
    return lib, data


def data_path() -> Path:
    """The ``espeak-ng-data`` directory shipped in the wheel."""
    return _paths()[1]


def list_variants() -> list[str]:
    """Voice variant names (files in ``espeak-ng-data/voices/!v``), sorted; e.g. ``"m3"``, ``"f2"``."""
    vdir = data_path() / "voices" / "!v"
    if not vdir.is_dir():
        raise EspeakError(f"eSpeak NG voice variant directory not found: {vdir}")
    return sorted(p.name for p in vdir.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: eSpeak language voice + variant, speed and pitch.

    ``language`` is an eSpeak voice name (``"en-us"``, ``"fr"``, ``"it"``, ``"nl"``...),
    ``variant`` a file in ``voices/!v`` (``"m3"``, ``"f2"``...) or ``""`` for the default,
    ``rate`` words per minute, ``pitch`` base pitch 0-100 and ``range`` pitch range 0-100
    (eSpeak's defaults are 175 wpm, 50 and 50).
    """

    language: str
    variant: str
    rate: int = 175
    pitch: int = 50
    range: int = 50

    def espeak_name(self) -> str:
        """The string given to ``espeak_SetVoiceByName``: ``"en+m3"``."""
        return f"{self.language}+{self.variant}" if self.variant else self.language

    def name(self) -> str:
        """Stable speaker-like id, e.g. ``"en-us+m3-r160-p45-g50"`` (no whitespace or tabs)."""
        variant = re.sub(r"\s+", "_", self.variant) if self.variant else "default"
        return f"{self.language}+{variant}-r{self.rate}-p{self.pitch}-g{self.range}"

    def check(self) -> None:
        """Raise :class:`EspeakError` for parameters out of eSpeak's ranges."""
        if not RATE_MIN <= self.rate <= RATE_MAX:
            raise EspeakError(f"voice {self.name()}: rate {self.rate} wpm outside [{RATE_MIN}, {RATE_MAX}]")
        for what, v in (("pitch", self.pitch), ("range", self.range)):
            if not 0 <= v <= 100:
                raise EspeakError(f"voice {self.name()}: {what} {v} outside [0, 100]")
        if not self.language or any(c in self.language for c in "+/\\\t\n "):
            raise EspeakError(f"invalid eSpeak language voice name {self.language!r}")


def _libc_srand() -> ctypes._CFuncPtr | None:
    """libc's ``srand`` (the Klatt generator calls ``rand()``), or None where it cannot be found."""
    name = None if sys.platform != "win32" else ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).srand
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_uint]
    return fn


class Espeak:
    """The process's eSpeak NG synthesizer (one per process: the C library is global state).

    Synthesis runs in ``AUDIO_OUTPUT_SYNCHRONOUS`` mode: ``espeak_Synth`` returns after the
    callback has received every sample, no background thread is involved. Not thread-safe;
    calls are serialized with a lock.
    """

    _instance: ClassVar[Espeak | None] = None
    _guard: ClassVar[threading.RLock] = threading.RLock()

    def __init__(self, buffer_ms: int = 500) -> None:
        with Espeak._guard:
            if Espeak._instance is not None:
                raise EspeakError(
                    "an Espeak instance already exists in this process (eSpeak NG has global "
                    "state); use Espeak.shared() to get it"
                )
            lib_path, data = _paths()
            try:
                lib = ctypes.CDLL(str(lib_path))
            except OSError as e:
                raise EspeakError(f"cannot load eSpeak NG library {lib_path}: {e}") from None
            self._lib = lib
            self._declare(lib)
            rate = lib.espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS, buffer_ms, str(data).encode(), ESPEAK_INITIALIZE_DONT_EXIT
            )
            if rate <= 0:
                raise EspeakError(f"espeak_Initialize failed (returned {rate}) with data directory {data}")
            self.sample_rate: int = int(rate)
            self._chunks: list[bytes] = []
            # Keep the ctypes callback object alive as long as the library may call it.
            self._callback = _SYNTH_CALLBACK(self._on_samples)
            lib.espeak_SetSynthCallback(self._callback)
            self._variants = frozenset(list_variants())
            # espeak_ng_SetRandSeed exists since 1.51; the Klatt voices also draw from libc rand().
            self._set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
            if self._set_rand_seed is not None:
                self._set_rand_seed.restype = None
                self._set_rand_seed.argtypes = [ctypes.c_long]
            self._libc_srand = _libc_srand()
            self._lock = threading.Lock()
            Espeak._instance = self

    @classmethod
    def shared(cls) -> Espeak:
        """This process's instance, created on first use."""
        with cls._guard:
            inst = cls._instance
            return inst if inst is not None else cls()

    @staticmethod
    def _declare(lib: ctypes.CDLL) -> None:
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []

    def _on_samples(self, wav: ctypes._Pointer, n: int, _events: int | None) -> int:
        if n > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, n * 2))
        return 0  # 0 = continue synthesis

    def set_voice(self, voice: Voice) -> None:
        """Select ``voice`` and its rate/pitch/range; raises :class:`EspeakError` if unknown."""
        voice.check()
        if voice.variant and voice.variant not in self._variants:
            raise EspeakError(
                f"unknown eSpeak NG voice variant {voice.variant!r} (voice {voice.espeak_name()!r}); "
                f"see espeak.list_variants()"
            )
        rc = self._lib.espeak_SetVoiceByName(voice.espeak_name().encode())
        if rc != EE_OK:
            raise EspeakError(f"unknown eSpeak NG voice {voice.espeak_name()!r} (error code {rc})")
        for param, value in ((ESPEAK_RATE, voice.rate), (ESPEAK_PITCH, voice.pitch), (ESPEAK_RANGE, voice.range)):
            rc = self._lib.espeak_SetParameter(param, int(value), 0)
            if rc != EE_OK:
                raise EspeakError(f"espeak_SetParameter({param}, {value}) failed with code {rc}")

    def synthesize(self, text: str, voice: Voice, seed: int | None = None) -> np.ndarray:
        """Speak ``text`` with ``voice``: float32 mono samples in [-1, 1] at :attr:`sample_rate`, ``[T]``.

        The voice and its parameters are set afresh on every call. ``seed`` (0 <= seed < 2**31)
        seeds eSpeak's noise generators (breath, aspiration) for this call; see the module
        docstring for what remains history-dependent.
        """
        if not text.strip():
            raise EspeakError("cannot synthesize empty text")
        if seed is not None and not 0 <= seed < 2**31:
            raise EspeakError(f"seed {seed} outside [0, 2**31)")
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            self.set_voice(voice)
            if seed is not None:
                if self._set_rand_seed is not None:
                    self._set_rand_seed(seed)
                if self._libc_srand is not None:
                    self._libc_srand(seed)
            self._chunks = []
            rc = self._lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
            if rc != EE_OK:
                raise EspeakError(f"espeak_Synth failed with code {rc} for text {text[:60]!r}")
            self._lib.espeak_Synchronize()
            raw = b"".join(self._chunks)
            self._chunks = []
        return np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
