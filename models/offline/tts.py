"""Speech synthesis with eSpeak NG through ctypes.

libespeak-ng keeps one synthesizer per process (voice, parameters and the synth callback are
global), so every call into it goes through `_EspeakLibrary`, a process-wide singleton guarded by
one lock. The library runs in synchronous mode: `espeak_Synth` returns once the text is spoken,
having handed the samples (int16 at the library's rate, 22050 Hz) to our callback piece by piece.
The callback can abort synthesis, which is how a long sentence is stopped early.

The library is looked up, in order: an explicit path, the copy bundled with the PyPI package
`espeakng-loader` (with its data), then the system's `libespeak-ng.so.1` (Debian: `libespeak-ng1`),
so a user without root can still speak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# espeak_AUDIO_OUTPUT: samples go to the callback and espeak_Synth returns when they all have.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_Initialize options: report errors instead of calling exit().
_INITIALIZE_DONT_EXIT = 0x8000
# espeak_Synth: position is counted in characters; the text is UTF-8.
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
# espeak_PARAMETER ids.
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_EE_OK = 0
# Milliseconds of audio per callback: small pieces let an abort land quickly.
_CALLBACK_BUFFER_MS = 100

_SYSTEM_LIBRARY_NAMES = ("libespeak-ng.so.1", "libespeak-ng.so", "libespeak-ng.dylib")
_SYSTEM_DATA_DIRS = (
    "/usr/lib/x86_64-linux-gnu/espeak-ng-data",
    "/usr/lib/aarch64-linux-gnu/espeak-ng-data",
    "/usr/share/espeak-ng-data",
    "/usr/local/share/espeak-ng-data",
)

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# A sentence ends at . ! or ? followed by space (or the end); decimals like 3.5 stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class EspeakNotFoundError(RuntimeError):
    """No usable libespeak-ng (or its data) was found."""


class SynthesisCancelled(Exception):
    """Synthesis was stopped by its `should_stop` check."""


@dataclass(frozen=True)
class EspeakLocation:
    """Where a libespeak-ng lives: the shared library, and its `espeak-ng-data` folder.

    `data_path` None lets the library use the folder it was built with.
    """

    library_path: str
    data_path: str | None


def find_espeak(library_path: str | None = None, data_path: str | None = None) -> EspeakLocation:
    """Locate libespeak-ng: explicit path, else `espeakng-loader`'s bundled copy, else the system's.

    Raises:
        EspeakNotFoundError: if none of them is present.
    """
    if library_path is not None:
        if not Path(library_path).exists():
            raise EspeakNotFoundError(f"libespeak-ng not found at {library_path}")
        return EspeakLocation(library_path, data_path)
    bundled = _bundled_location()
    if bundled is not None:
        return bundled
    system = _system_location(data_path)
    if system is not None:
        return system
    raise EspeakNotFoundError(
        "libespeak-ng not found: install the PyPI package `espeakng-loader` "
        "(pip install espeakng-loader) or the system library (apt install libespeak-ng1), "
        "or pass library_path= to SpeechSynthesizer"
    )


def _bundled_location() -> EspeakLocation | None:
    try:
        import espeakng_loader
    except ImportError:
        return None
    library = Path(espeakng_loader.get_library_path())
    try:
        data = espeakng_loader.get_data_path()
    except RuntimeError:
        return None
    return EspeakLocation(str(library), data) if library.exists() else None


def _system_location(data_path: str | None) -> EspeakLocation | None:
    names = [ctypes.util.find_library("espeak-ng"), *_SYSTEM_LIBRARY_NAMES]
    for name in filter(None, names):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        if data_path is None:
            data_path = next((d for d in _SYSTEM_DATA_DIRS if Path(d).is_dir()), None)
        return EspeakLocation(name, data_path)
    return None


class _EspeakLibrary:
    """The process's one libespeak-ng instance; every method takes the lock."""

    _instance: _EspeakLibrary | None = None
    _instance_lock = threading.Lock()

    def __init__(self, location: EspeakLocation) -> None:
        self.location = location
        self.lock = threading.Lock()
        self._lib = ctypes.CDLL(location.library_path)
        self._declare_signatures()
        data = location.data_path.encode() if location.data_path else None
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _CALLBACK_BUFFER_MS, data, _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EspeakNotFoundError(
                f"espeak_Initialize failed ({rate}) with data path {location.data_path!r}"
            )
        self.sample_rate: int = rate
        self._pieces: list[np.ndarray] = []
        self._should_stop: Callable[[], bool] | None = None
        self._stopped = False
        self._settings: tuple[str, int, int, int] | None = None
        self._callback = _SynthCallback(self._on_samples)  # kept alive as long as the library
        self._lib.espeak_SetSynthCallback(self._callback)
        logger.info("eSpeak NG loaded from %s (%d Hz)", location.library_path, rate)

    @classmethod
    def get(cls, location: EspeakLocation) -> _EspeakLibrary:
        """The shared instance, created on first use (later locations must match the first)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(location)
            elif cls._instance.location.library_path != location.library_path:
                logger.warning(
                    "eSpeak NG already loaded from %s; ignoring %s",
                    cls._instance.location.library_path,
                    location.library_path,
                )
            return cls._instance

    def _declare_signatures(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
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
        lib.espeak_Synth.restype = ctypes.c_int

    def _on_samples(self, wav: Any, count: int, _events: Any) -> int:
        """Synth callback: keep `count` samples; return 1 to abort synthesis."""
        if count > 0 and wav:
            self._pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        if self._should_stop is not None and self._should_stop():
            self._stopped = True
            return 1
        return 0

    def _apply(self, voice: str, rate: int, pitch: int, volume: int) -> None:
        settings = (voice, rate, pitch, volume)
        if settings == self._settings:
            return
        if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"eSpeak NG has no voice named {voice!r}")
        for parameter, value in (
            (_PARAM_RATE, rate),
            (_PARAM_PITCH, pitch),
            (_PARAM_VOLUME, volume),
        ):
            self._lib.espeak_SetParameter(parameter, value, 0)
        self._settings = settings

    def synthesize(
        self,
        text: str,
        voice: str,
        rate: int,
        pitch: int,
        volume: int,
        should_stop: Callable[[], bool] | None,
    ) -> np.ndarray:
        """Speak `text`; returns int16 samples at `sample_rate`.

        Raises:
            SynthesisCancelled: if `should_stop` returned True before the text was spoken.
        """
        encoded = text.encode("utf-8") + b"\0"
        with self.lock:
            self._apply(voice, rate, pitch, volume)
            self._pieces, self._should_stop, self._stopped = [], should_stop, False
            try:
                status = self._lib.espeak_Synth(
                    encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
                )
                pieces, stopped = self._pieces, self._stopped
            finally:
                self._pieces, self._should_stop = [], None
        if stopped:
            raise SynthesisCancelled
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with status {status}")
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at . ! ? followed by whitespace; blank pieces are dropped."""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece.strip()]


class SpeechSynthesizer:
    """Text to speech with eSpeak NG: mono float32 in [-1, 1] at `sample_rate` (22050 Hz).

    Thread-safe: instances share the process's one library and take turns on it.

    Args:
        voice: an eSpeak NG voice name, e.g. "en-us" or "en-us+f3".
        rate_wpm: speaking rate in words per minute (eSpeak's range is about 80-450).
        pitch: base pitch, 0-100 (50 is the voice's normal).
        volume: loudness, 0-200 (100 is normal).
        library_path, data_path: an explicit libespeak-ng and `espeak-ng-data` folder.
    """

    def __init__(
        self,
        voice: str = "en-us",
        rate_wpm: int = 175,
        pitch: int = 50,
        volume: int = 100,
        library_path: str | None = None,
        data_path: str | None = None,
    ) -> None:
        self.voice = voice
        self.rate_wpm = rate_wpm
        self.pitch = pitch
        self.volume = volume
        self._library = _EspeakLibrary.get(find_espeak(library_path, data_path))

    @property
    def sample_rate(self) -> int:
        """Samples per second of the audio this synthesizer returns."""
        return self._library.sample_rate

    def synthesize(self, text: str, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Speak `text`; returns (T,) float32 in [-1, 1] at `sample_rate`.

        `should_stop` is polled every ~100 ms of audio made; when it returns True synthesis
        stops and `SynthesisCancelled` is raised.
        """
        if not text.strip():
            return np.zeros(0, np.float32)
        samples = self._library.synthesize(
            text, self.voice, self.rate_wpm, self.pitch, self.volume, should_stop
        )
        return samples.astype(np.float32) / 32768.0

    def synthesize_sentences(self, text: str) -> Iterator[tuple[str, np.ndarray]]:
        """Speak `text` one sentence at a time: yields (sentence, its audio) as each is ready."""
        for sentence in split_sentences(text):
            yield sentence, self.synthesize(sentence)


__all__ = [
    "EspeakLocation",
    "EspeakNotFoundError",
    "SpeechSynthesizer",
    "SynthesisCancelled",
    "find_espeak",
    "split_sentences",
]
