"""A ctypes binding to SpeexDSP's echo canceller and preprocessor (Debian `libspeexdsp1`).

Only the handful of calls an echo canceller needs: the adaptive filter
(`speex_echo_state_init`, `speex_echo_cancellation`, `speex_echo_ctl`, `speex_echo_state_destroy`) and the
preprocessor that suppresses the echo the linear filter leaves behind (and, optionally, noise).
SpeexDSP works on int16 frames of a fixed size chosen at init.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import weakref

import numpy as np

logger = logging.getLogger(__name__)

LIBRARY_NAMES = ("libspeexdsp.so.1", "libspeexdsp.so")

# Request codes from speex_echo.h and speex_preprocess.h.
_ECHO_SET_SAMPLING_RATE = 24
_PREPROCESS_SET_DENOISE = 0
_PREPROCESS_SET_NOISE_SUPPRESS = 18
_PREPROCESS_SET_ECHO_SUPPRESS = 20
_PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE = 22
_PREPROCESS_SET_ECHO_STATE = 24

_Int16Ptr = ctypes.POINTER(ctypes.c_int16)


@functools.cache
def load_speexdsp() -> ctypes.CDLL:
    """The SpeexDSP shared library with typed signatures; OSError when it is not installed."""
    candidates = [*LIBRARY_NAMES, ctypes.util.find_library("speexdsp")]
    errors = []
    for name in filter(None, candidates):
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        _declare(lib)
        logger.debug("loaded %s", name)
        return lib
    raise OSError("libspeexdsp not found (Debian: apt install libspeexdsp1): " + "; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    lib.speex_echo_state_init.argtypes, lib.speex_echo_state_init.restype = [i32, i32], vp
    lib.speex_echo_state_destroy.argtypes, lib.speex_echo_state_destroy.restype = [vp], None
    lib.speex_echo_ctl.argtypes, lib.speex_echo_ctl.restype = [vp, i32, vp], i32
    lib.speex_echo_cancellation.argtypes = [vp, _Int16Ptr, _Int16Ptr, _Int16Ptr]
    lib.speex_echo_cancellation.restype = None
    lib.speex_preprocess_state_init.argtypes = [i32, i32]
    lib.speex_preprocess_state_init.restype = vp
    lib.speex_preprocess_state_destroy.argtypes = [vp]
    lib.speex_preprocess_state_destroy.restype = None
    lib.speex_preprocess_ctl.argtypes, lib.speex_preprocess_ctl.restype = [vp, i32, vp], i32
    lib.speex_preprocess_run.argtypes, lib.speex_preprocess_run.restype = [vp, _Int16Ptr], i32


def _ptr(x: np.ndarray) -> ctypes._Pointer:  # type: ignore[type-arg]
    return x.ctypes.data_as(_Int16Ptr)


def _destroy(lib: ctypes.CDLL, echo: int, preprocess: int | None) -> None:
    if preprocess:
        lib.speex_preprocess_state_destroy(preprocess)
    lib.speex_echo_state_destroy(echo)


class SpeexEchoState:
    """One SpeexDSP echo canceller (plus optional residual-echo suppressor) on int16 frames.

    `frame_size` samples per call; the adaptive filter spans `filter_length` samples (it must
    cover the bulk delay and the reverberation left after any external delay compensation).
    With `residual_suppression` the preprocessor removes what the linear filter leaves, down
    to `echo_suppress_db` (`echo_suppress_active_db` while the near end talks). Speex applies
    those gains only through its denoiser, so that runs too, removing stationary noise down to
    `noise_suppress_db`; the preprocessor delays the output by one frame.
    """

    def __init__(
        self,
        frame_size: int,
        filter_length: int,
        sample_rate: int,
        residual_suppression: bool = True,
        echo_suppress_db: int = -40,
        echo_suppress_active_db: int = -15,
        noise_suppress_db: int = -15,
    ) -> None:
        self._lib = load_speexdsp()
        self.frame_size = frame_size
        self._echo = self._lib.speex_echo_state_init(frame_size, filter_length)
        if not self._echo:
            raise MemoryError("speex_echo_state_init failed")
        self._pre: int | None = None
        levels_db = {
            _PREPROCESS_SET_ECHO_SUPPRESS: echo_suppress_db,
            _PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE: echo_suppress_active_db,
            _PREPROCESS_SET_NOISE_SUPPRESS: noise_suppress_db,
        }
        try:
            self._configure(sample_rate, levels_db if residual_suppression else None)
        except BaseException:
            _destroy(self._lib, self._echo, self._pre)
            raise
        self._out = np.zeros(frame_size, np.int16)
        self._finalizer = weakref.finalize(self, _destroy, self._lib, self._echo, self._pre)

    def _configure(self, sample_rate: int, preprocess_levels_db: dict[int, int] | None) -> None:
        """Set the rate; with levels, add the preprocessor tied to the echo state."""
        self._set(self._lib.speex_echo_ctl, self._echo, _ECHO_SET_SAMPLING_RATE, sample_rate)
        if preprocess_levels_db is None:
            return
        self._pre = self._lib.speex_preprocess_state_init(self.frame_size, sample_rate)
        if not self._pre:
            raise MemoryError("speex_preprocess_state_init failed")
        ctl = self._lib.speex_preprocess_ctl
        self._set(ctl, self._pre, _PREPROCESS_SET_DENOISE, 1)
        # The preprocessor reads the echo state's residual-echo estimate directly.
        ctl(self._pre, _PREPROCESS_SET_ECHO_STATE, self._echo)
        for request, value in preprocess_levels_db.items():
            self._set(ctl, self._pre, request, value)

    @staticmethod
    def _set(ctl: ctypes._CFuncPtr, state: int, request: int, value: int) -> None:
        arg = ctypes.c_int32(value)
        if ctl(state, request, ctypes.byref(arg)) != 0:
            raise ValueError(f"speexdsp rejected control request {request} = {value}")

    def cancel(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """Remove the echo of `far` from `near`; both int16 [frame_size], contiguous.

        Returns a new int16 [frame_size] array.
        """
        if not self._finalizer.alive:
            raise RuntimeError("this speex echo state is closed")
        self._lib.speex_echo_cancellation(self._echo, _ptr(near), _ptr(far), _ptr(self._out))
        if self._pre is not None:
            self._lib.speex_preprocess_run(self._pre, _ptr(self._out))
        return self._out.copy()

    def close(self) -> None:
        """Free the native state now (otherwise when the object is collected)."""
        self._finalizer()


__all__ = ["SpeexEchoState", "load_speexdsp"]
