"""Lightweight futures for the producer.

One `BatchState` (the completion object) is shared by every record of an accumulated buffer or of one
`send_batch` call; each record gets a tiny `RecordFuture(state, index)`. Completing a state is O(1)
Python work plus running the registered callbacks: offsets are written with numpy into the state's
`offsets` array and each record reads its own slot lazily.

Per-row errors: rows of a produce request that failed are marked in a lazily allocated `err_idx`
array (0 = ok, k = `errors[k-1]`), so records of other partitions in the same state still succeed.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np

from ..errors import BrokerTimeoutError
from ..records import BatchMetadata, RecordMetadata

log = logging.getLogger(__name__)

__all__ = ["BatchState", "RecordFuture", "BatchFuture", "FutureBase"]


class BatchState:
    """Completion shared by many records. Completed once; thread-safe."""

    __slots__ = ("topic", "num_rows", "partitions", "offsets", "err_idx", "errors", "exc",
                 "_done", "_event", "_lock", "_callbacks", "_outstanding", "_sealed", "nbytes",
                 "_on_complete")

    def __init__(self, topic: str, num_rows: int = 0):
        self.topic = topic
        self.num_rows = num_rows
        self.partitions: np.ndarray | None = None   # int64 per row, set when rows are partitioned
        self.offsets: np.ndarray | None = None      # int64 per row, -1 until known
        self.err_idx: np.ndarray | None = None      # int16 per row, allocated on the first error
        self.errors: list[BaseException] = []
        self.exc: BaseException | None = None       # error for every row (e.g. failed before partitioning)
        self._done = False
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[tuple[Callable, Any]] = []
        self._outstanding = 0
        self._sealed = False
        self.nbytes = 0
        self._on_complete: Callable[["BatchState"], None] | None = None

    # --- producer side --------------------------------------------------------------------------
    def set_rows(self, partitions: np.ndarray) -> None:
        self.num_rows = len(partitions)
        self.partitions = partitions
        self.offsets = np.full(len(partitions), -1, dtype=np.int64)

    def add_pieces(self, n: int) -> None:
        with self._lock:
            self._outstanding += n

    def seal(self) -> None:
        """No more pieces will be added; completes now if nothing is outstanding."""
        with self._lock:
            self._sealed = True
            finish = self._outstanding == 0 and not self._done
        if finish:
            self._complete()

    def piece_succeeded(self, rows: np.ndarray, base_offset: int) -> None:
        if base_offset >= 0:
            self.offsets[rows] = base_offset + np.arange(len(rows), dtype=np.int64)
        self._piece_done()

    def piece_failed(self, rows: np.ndarray, exc: BaseException) -> None:
        with self._lock:
            if self.err_idx is None:
                self.err_idx = np.zeros(self.num_rows, dtype=np.int16)
            if not self.errors or self.errors[-1] is not exc:
                self.errors.append(exc)
            self.err_idx[rows] = len(self.errors)
        self._piece_done()

    def _piece_done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            finish = self._sealed and self._outstanding == 0 and not self._done
        if finish:
            self._complete()

    def fail(self, exc: BaseException) -> None:
        """Fail every row (idempotent: no effect once complete)."""
        with self._lock:
            if self._done:
                return
            self.exc = exc
        self._complete()

    def _complete(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        self._event.set()
        hook = self._on_complete
        if hook is not None:
            try:
                hook(self)
            except Exception:  # pragma: no cover
                log.exception("completion hook failed")
        for fn, fut in callbacks:
            try:
                fn(fut)
            except Exception:
                log.exception("exception in future callback %r", fn)

    # --- consumer side --------------------------------------------------------------------------
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None) -> None:
        if not self._done and not self._event.wait(timeout):
            raise BrokerTimeoutError(f"result not available within {timeout} s")

    def add_callback(self, fn: Callable, fut: Any) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append((fn, fut))
                return
        try:
            fn(fut)
        except Exception:
            log.exception("exception in future callback %r", fn)

    def row_error(self, i: int) -> BaseException | None:
        if self.exc is not None:
            return self.exc
        if self.err_idx is not None:
            k = int(self.err_idx[i])
            if k:
                return self.errors[k - 1]
        return None

    def first_error(self) -> BaseException | None:
        if self.exc is not None:
            return self.exc
        return self.errors[0] if self.errors else None


class FutureBase:
    __slots__ = ()

    def done(self) -> bool:
        return self._state._done  # type: ignore[attr-defined]

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call `fn(self)` when done (immediately, in this thread, if already done)."""
        self._state.add_callback(fn, self)  # type: ignore[attr-defined]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait up to `timeout` s; the error, or None on success. `BrokerTimeoutError` if not done."""
        self._state.wait(timeout)  # type: ignore[attr-defined]
        return self._error()

    def cancelled(self) -> bool:
        return False

    def _error(self) -> BaseException | None:  # pragma: no cover - overridden
        raise NotImplementedError


class RecordFuture(FutureBase):
    """Future of one record sent with `Producer.send`; result is `RecordMetadata`."""

    __slots__ = ("_state", "_index")

    def __init__(self, state: BatchState, index: int):
        self._state = state
        self._index = index

    def _error(self) -> BaseException | None:
        return self._state.row_error(self._index)

    def result(self, timeout: float | None = None) -> RecordMetadata:
        st = self._state
        st.wait(timeout)
        exc = st.row_error(self._index)
        if exc is not None:
            raise exc
        i = self._index
        return RecordMetadata(st.topic, int(st.partitions[i]), int(st.offsets[i]))

    def __repr__(self) -> str:
        return f"<RecordFuture topic={self._state.topic} index={self._index} done={self.done()}>"


class BatchFuture(FutureBase):
    """Future of a `send_batch` call; result is `BatchMetadata` aligned with the input rows.

    If any row failed, `result()` raises the first error (rows of other partitions may have been
    written; `state.offsets` shows which, -1 = not written).
    """

    __slots__ = ("_state",)

    def __init__(self, state: BatchState):
        self._state = state

    @property
    def state(self) -> BatchState:
        return self._state

    def _error(self) -> BaseException | None:
        return self._state.first_error()

    def result(self, timeout: float | None = None) -> BatchMetadata:
        st = self._state
        st.wait(timeout)
        exc = st.first_error()
        if exc is not None:
            raise exc
        parts = st.partitions if st.partitions is not None else np.zeros(0, dtype=np.int64)
        offs = st.offsets if st.offsets is not None else np.zeros(0, dtype=np.int64)
        return BatchMetadata(st.topic, parts, offs)

    def __repr__(self) -> str:
        return f"<BatchFuture topic={self._state.topic} rows={self._state.num_rows} done={self.done()}>"
