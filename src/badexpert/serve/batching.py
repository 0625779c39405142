"""Micro-batching: concurrent requests' inputs gathered into one forward pass of the model.

One worker coroutine takes queued requests, gathers their inputs up to ``max_batch`` (waiting at
most ``wait_s`` for more, and not at all when no other request is being read or parsed), runs the
model once in a dedicated thread (one forward at a time) and answers each request its slice;
requests that arrive while the model runs are gathered into the next batch. A request that would
take the queue beyond ``max_queue`` inputs is refused at once (:class:`Unavailable`, a 503).
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np

from ..runtime.reasons import nonfinite_inputs, reject_reasons
from .codecs import Unavailable
from .logs import log_event


def check_output(out: Any, n: int, x: np.ndarray | None = None) -> dict:
    """A service model's answer for ``n`` inputs (the batch ``x``), checked: the five arrays of
    ``n`` values, and the reasons (the model's, or the guard's rule applied to ``x`` and the answer)."""
    if not isinstance(out, Mapping):
        raise RuntimeError(f"the service model returned {type(out).__name__}, not a dict of arrays")
    fixed = {}
    for key in ("label", "confidence", "score", "p_value", "reject"):
        if key not in out:
            raise RuntimeError(f"the service model's output lacks '{key}'")
        arr = np.asarray(out[key]).reshape(-1)
        if len(arr) != n:
            raise RuntimeError(f"the service model returned {len(arr)} values of '{key}' for {n} inputs")
        fixed[key] = arr
    # the model's reasons, or (for a model that gives none) the guard's own rule applied to its flags
    reason = out.get("reason")
    fixed["reason"] = ([str(r) for r in reason] if reason is not None
                       else reject_reasons(fixed["reject"].astype(bool), fixed["score"].astype(np.float64),
                                           None if x is None else nonfinite_inputs(x)))
    return fixed


class _Job:
    __slots__ = ("x", "future")

    def __init__(self, x: np.ndarray, future: asyncio.Future) -> None:
        self.x = x
        self.future = future


class MicroBatcher:
    """One worker coroutine: gather queued requests' inputs up to ``max_batch`` (waiting at most
    ``wait_s`` for more while ``incoming`` requests are still being read or parsed), run the model once in a single dedicated thread, hand each request its
    slice. Inputs of different dtypes (uint8 / float32) in one gathering are run as one forward per
    dtype, so every input is converted exactly as the Python API converts it."""

    def __init__(self, model, *, max_batch: int, wait_s: float, max_queue: int,
                 on_batch: Callable[[dict, int], None]) -> None:
        self.model = model
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_s)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.queued = 0
        self.incoming = 0  # requests being read or parsed: inputs on their way to the queue
        #: How each gathering ended: "full" (max_batch reached, or the next request would overflow
        #: it), "idle" (queue empty and nothing on its way: no wait at all), "deadline" (wait_s spent)
        self.closed = {"full": 0, "idle": 0, "deadline": 0}
        self.ready = False
        self.failure: str | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="badexpert-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Unavailable("the service is shutting down; retry"))
        self._executor.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> dict:
        if not self.ready or self._queue is None:
            raise Unavailable(self.failure or "the service is warming up; retry shortly")
        if self.queued + len(x) > self.max_queue:
            raise Unavailable(f"the service is overloaded ({self.queued} inputs waiting); retry shortly")
        fut = asyncio.get_running_loop().create_future()
        self.queued += len(x)
        self._queue.put_nowait(_Job(x, fut))
        return await fut

    def _forward(self, arrays: list[np.ndarray]) -> list[dict]:
        """In the model thread: one forward per dtype group, results back in request order."""
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype.str, []).append(i)
        results: list[dict | None] = [None] * len(arrays)
        for idx in groups.values():
            x = np.concatenate([arrays[i] for i in idx]) if len(idx) > 1 else arrays[idx[0]]
            out = check_output(self.model(x), len(x), x)
            start = 0
            for i in idx:
                n = len(arrays[i])
                results[i] = {k: v[start:start + n] for k, v in out.items()}
                start += n
        return results  # type: ignore[return-value]

    async def warm_up(self, input_shape) -> None:
        loop = asyncio.get_running_loop()
        x = np.zeros((1, *input_shape), dtype=np.uint8)
        t0 = time.perf_counter()
        await loop.run_in_executor(self._executor, self._forward, [x])
        await loop.run_in_executor(self._executor, self._forward, [np.zeros((min(self.max_batch, 32), *input_shape),
                                                                            dtype=np.uint8)])
        self.ready = True
        log_event(logging.INFO, "ready", warmup_ms=round((time.perf_counter() - t0) * 1000, 1))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        carry: _Job | None = None
        while True:
            job = carry if carry is not None else await queue.get()
            carry = None
            jobs, n = [job], len(job.x)
            deadline = loop.time() + self.wait_s
            closed = "full"
            while n < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    if self.incoming == 0:  # nothing on its way: waiting would only add latency
                        closed = "idle"
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        closed = "deadline"
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        closed = "deadline"
                        break
                if n + len(nxt.x) > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.x)
            self.closed[closed] += 1
            self.queued -= n
            live = [j for j in jobs if not j.future.done()]  # a cancelled request needs no answer
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._forward, [j.x for j in live])
            except asyncio.CancelledError:
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(Unavailable("the service is shutting down; retry"))
                raise
            except Exception as exc:  # the model failed: those requests get a 500, the worker goes on
                log_event(logging.ERROR, "model_error", exc_info=exc, n_inputs=sum(len(j.x) for j in live))
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            try:
                self.on_batch({k: np.concatenate([r[k] for r in results]) if k != "reason" else
                               [s for r in results for s in r[k]] for k in results[0]},
                              sum(len(j.x) for j in live))
            except Exception as exc:  # monitoring must never take the service down
                log_event(logging.ERROR, "monitor_error", exc_info=exc)
            for j, r in zip(live, results):
                if not j.future.done():
                    j.future.set_result(r)


__all__ = ["MicroBatcher", "check_output"]
