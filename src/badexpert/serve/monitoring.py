"""What the service watches: the drift alarm over served inputs and the Prometheus metrics.

:class:`Metrics` counts served and refused traffic; :meth:`Metrics.render` writes them, with the
drift monitor's state and the process's memory, in the Prometheus text format through
``prometheus_client`` (one registry per scrape, filled from the counters here, so several apps in
one process never share or clash).
"""

import math
import time
from collections import deque
from datetime import datetime, timezone
from typing import Callable

import numpy as np

#: Upper bounds (seconds) of the request latency histogram's buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The text format's media type (what ``prometheus_client.generate_latest`` writes).
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DriftMonitor:
    """Sliding window over the last ``window`` served inputs' reject flags (and p-values).

    Under normal (clean) traffic each input is rejected with probability at most ``rate`` (the
    detector's expected clean rejection rate: the conformal bound on the inputs the model gets
    right, the measured rate on its calibration errors), so the number ``k`` of rejections among the
    ``n`` inputs of the window is at most Binomial(n, rate) in distribution. Every time the window
    advances, the one-sided exact binomial test ``P(K >= k) = binom.sf(k - 1, n, rate)`` is
    computed; the alarm is on while that p-value is below ``alpha`` and clears when it no longer is.
    """

    def __init__(self, rate: float | None, *, window: int = 500, alpha: float = 1e-3,
                 on_change: Callable[[bool, dict], None] | None = None) -> None:
        self.rate = rate
        self.window = int(window)
        self.alpha = float(alpha)
        self.on_change = on_change
        self.flags: deque[bool] = deque(maxlen=self.window)
        self.p_values: deque[float] = deque(maxlen=self.window)
        self.k = 0
        self.p_value = 1.0
        self.alarm = False
        self.alarms_raised = 0
        self.alarm_since: float | None = None
        self.checks = 0
        if self.enabled:
            import scipy.stats  # noqa: F401 - imported now, not inside the first request

    @property
    def enabled(self) -> bool:
        return self.rate is not None and 0 < self.rate < 1

    def update(self, reject, p_values) -> None:
        if not self.enabled:
            return
        for r, p in zip(np.asarray(reject, dtype=bool).tolist(), np.asarray(p_values, dtype=np.float64).tolist()):
            if len(self.flags) == self.window:
                self.k -= self.flags[0]
            self.flags.append(r)
            self.p_values.append(p)
            self.k += r
        self._test()

    def _test(self) -> None:
        from scipy.stats import binom

        n, k = len(self.flags), self.k
        self.p_value = float(binom.sf(k - 1, n, self.rate)) if k > 0 else 1.0
        self.checks += 1
        alarm = self.p_value < self.alpha
        if alarm != self.alarm:
            self.alarm = alarm
            if alarm:
                self.alarms_raised += 1
                self.alarm_since = time.time()
            else:
                self.alarm_since = None
            if self.on_change is not None:
                self.on_change(alarm, self.state())

    def state(self) -> dict:
        n = len(self.flags)
        finite = [p for p in self.p_values if not math.isnan(p)]
        return {
            "enabled": self.enabled,
            "test": "one-sided exact binomial: P(K >= k), K ~ Binomial(n, rate)",
            "window": self.window, "n": n, "rejections": self.k,
            "rejection_rate": (self.k / n) if n else None,
            "rate": self.rate, "alpha": self.alpha, "p_value": self.p_value,
            "mean_input_p_value": (sum(finite) / len(finite)) if finite else None,
            "alarm": self.alarm, "alarms_raised": self.alarms_raised,
            "alarm_since": (datetime.fromtimestamp(self.alarm_since, timezone.utc).isoformat(timespec="seconds")
                            if self.alarm_since else None),
        }


class Metrics:
    """Counters and the latency histogram of one service, rendered by ``prometheus_client``.

    Served traffic (requests, inputs, rejections, latency, drift window) and refused requests are
    counted apart: a bad request only moves ``badexpert_bad_requests_total``.
    """

    BAD_STATUSES = (400, 404, 405, 413, 415, 422)

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.inputs = 0
        self.rejections = 0
        self.bad_requests = {s: 0 for s in self.BAD_STATUSES}
        self.unavailable = 0
        self.errors = 0
        self.batches = 0
        self.batch_inputs = 0
        self.buckets = [0] * len(LATENCY_BUCKETS)  # cumulative: requests at most each bound
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe_served(self, n: int, rejected: int, seconds: float) -> None:
        self.requests += 1
        self.inputs += n
        self.rejections += rejected
        self.latency_sum += seconds
        self.latency_count += 1
        for i, le in enumerate(LATENCY_BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1

    def bad(self, status: int) -> None:
        self.bad_requests[status] = self.bad_requests.get(status, 0) + 1

    def families(self, *, ready: bool, queued: int, drift: DriftMonitor, model_info: dict) -> list:
        """The service's metric families (``prometheus_client`` objects) at this moment."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def counter(name, help_, value):
            return CounterMetricFamily(name, help_, value=value)

        def gauge(name, help_, value):
            return GaugeMetricFamily(name, help_, value=value)

        bad = CounterMetricFamily("badexpert_bad_requests_total", "classify requests refused as bad (4xx), by status",
                                  labels=["status"])
        for status, v in sorted(self.bad_requests.items()):
            bad.add_metric([str(status)], v)
        latency = HistogramMetricFamily(
            "badexpert_request_latency_seconds", "latency of served classify requests",
            buckets=[(_bound(le), v) for le, v in zip(LATENCY_BUCKETS, self.buckets)] + [("+Inf", self.latency_count)],
            sum_value=self.latency_sum)
        st = drift.state()
        info_labels = {k: str(v) for k, v in model_info.items() if v is not None}
        info = GaugeMetricFamily("badexpert_info", "the served model", labels=list(info_labels))
        info.add_metric(list(info_labels.values()), 1)
        nan = float("nan")
        return [
            counter("badexpert_requests_total", "classify requests served (2xx)", self.requests),
            counter("badexpert_inputs_total", "inputs classified in served requests", self.inputs),
            counter("badexpert_rejections_total", "served inputs rejected by the guard", self.rejections),
            bad,
            counter("badexpert_unavailable_total", "classify requests answered 503 (not ready, overloaded)",
                    self.unavailable),
            counter("badexpert_errors_total", "classify requests that failed inside the service (5xx)", self.errors),
            counter("badexpert_batches_total", "forward passes of the model (micro-batches)", self.batches),
            counter("badexpert_batch_inputs_total", "inputs in those forward passes", self.batch_inputs),
            latency,
            gauge("badexpert_drift_alarm", "1 while the rejection rate in the window exceeds the reference rate "
                  "beyond chance (binomial test p-value < alpha)", int(st["alarm"])),
            gauge("badexpert_drift_p_value", "p-value of the binomial test of the window's rejections", st["p_value"]),
            gauge("badexpert_drift_window_inputs", "served inputs in the drift window", st["n"]),
            gauge("badexpert_drift_window_rejections", "rejected inputs in the drift window", st["rejections"]),
            gauge("badexpert_drift_rejection_rate", "share of rejected inputs in the drift window",
                  st["rejection_rate"] if st["rejection_rate"] is not None else nan),
            gauge("badexpert_drift_reference_rate", "reference rejection rate (expected share of clean inputs rejected)",
                  st["rate"] if st["rate"] is not None else nan),
            counter("badexpert_drift_alarms_total", "times the drift alarm was raised", st["alarms_raised"]),
            gauge("badexpert_ready", "1 once the model is loaded and warmed up", int(ready)),
            gauge("badexpert_queue_inputs", "inputs waiting for the model", queued),
            info,
        ]

    def render(self, *, ready: bool, queued: int, drift: DriftMonitor, model_info: dict) -> str:
        """The Prometheus text format: the families above, and the process's memory, CPU time and
        start time (``prometheus_client``'s process collector, where the platform has ``/proc``)."""
        from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

        families = self.families(ready=ready, queued=queued, drift=drift, model_info=model_info)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(families))
        ProcessCollector(registry=registry)
        return generate_latest(registry).decode("utf-8")


class _Fixed:
    """A collector that yields families computed beforehand (one scrape's worth)."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


def _bound(le: float) -> str:
    """A histogram bucket's ``le`` label: ``0.005``, ``1``, ``10``."""
    return str(int(le)) if float(le).is_integer() else repr(float(le))


__all__ = ["LATENCY_BUCKETS", "METRICS_MEDIA_TYPE", "DriftMonitor", "Metrics"]
