"""Replay a tensor function as CUDA graphs, one recorded per input shape.

Small-batch inference of these models is bound by launching kernels, not by the GPU: a
one-token LM step is about a thousand kernels, one flow-sampler call about sixteen thousand.
Recorded once into a CUDA graph, each later call is one launch. `CudaGraphCache` records a
function the first time it sees an input signature (shapes, dtypes, devices) and replays the
recording afterwards, so callers whose shapes take few values (a batch bucket, a decoder
block of fixed size) get graphs without a compiler and without changing their code.

What a recorded function may do: tensor work on its inputs and on tensors that keep their
storage between calls (weights, preallocated caches, whose contents can change). What it may
not: read tensor values on the host (`.item()`, `.tolist()`, a Python `if` on a tensor),
allocate host tensors, or depend on anything but its inputs' values and those tensors.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["CudaGraphCache"]

# One recording at a time in the process (torch allows one capture under way): the LM's
# worker thread and the decoder's lane may both meet a new shape at once.
_RECORDING = threading.Lock()


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor


def _signature(tensors: tuple[Tensor, ...]) -> Hashable:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


class CudaGraphCache:
    """`fn(*tensors) -> Tensor` replayed as one CUDA graph per input signature.

    The first call with a signature runs `fn` `warm_up_runs` times on a side stream (as
    capture requires: it lets libraries pick kernels and allocate workspaces), then captures
    it; every call copies its inputs into the recording's input buffers and replays. So `fn`
    runs for real `warm_up_runs` times on the first call: it must give the same result when
    repeated on the same inputs (writing the same cache entries is fine).

    The returned tensor is the recording's output buffer: every recording shares one memory
    pool, so the next call (of any signature) may overwrite it. Copy it before calling again.
    At most `max_graphs` recordings are kept; the least recently used one is dropped.

    Recording is safe while other threads run CUDA work on streams of their own: one
    recording at a time in the process, and the capture only checks its own thread's calls.
    """

    def __init__(
        self, fn: Callable[..., Tensor], max_graphs: int = 32, warm_up_runs: int = 2
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        if max_graphs < 1 or warm_up_runs < 1:
            raise ValueError("need max_graphs >= 1 and warm_up_runs >= 1")
        self._fn = fn
        self._max_graphs = max_graphs
        self._warm_up_runs = warm_up_runs
        self._recordings: OrderedDict[Hashable, _Recording] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle()
        self.recorded = 0  # recordings made so far (kept or dropped)

    def __len__(self) -> int:
        return len(self._recordings)

    def __call__(self, *tensors: Tensor) -> Tensor:
        key = _signature(tensors)
        recording = self._recordings.get(key)
        if recording is None:
            recording = self._record(key, tensors)
        else:
            self._recordings.move_to_end(key)
            for buffer, value in zip(recording.inputs, tensors, strict=True):
                if buffer.data_ptr() != value.data_ptr():
                    buffer.copy_(value)
        recording.graph.replay()
        return recording.output

    def _record(self, key: Hashable, tensors: tuple[Tensor, ...]) -> _Recording:
        if not tensors or any(not t.is_cuda for t in tensors):
            raise ValueError("every input of a CUDA graph must be a CUDA tensor")
        with _RECORDING:
            return self._record_alone(key, tensors)

    def _record_alone(self, key: Hashable, tensors: tuple[Tensor, ...]) -> _Recording:
        device = tensors[0].device
        inputs = tuple(t.clone() for t in tensors)
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(self._warm_up_runs):
                self._fn(*inputs)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": CUDA work that another thread issues meanwhile on its own stream
        # (the decoder lane, or the LM worker) does not invalidate the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self._fn(*inputs)
        if not isinstance(output, Tensor):
            raise TypeError(f"a graphed function must return one tensor, not {type(output)}")
        recording = _Recording(graph, inputs, output)
        self._recordings[key] = recording
        self.recorded += 1
        while len(self._recordings) > self._max_graphs:
            _, dropped = self._recordings.popitem(last=False)
            dropped.graph.reset()
        logger.debug("recorded a CUDA graph for %s (%d kept)", key, len(self._recordings))
        return recording
