"""Load test of `badexpert serve` on loopback: the guarded service against the bare model.

    python bench/serve_load.py --bundle /tmp/bundle.safetensors [--duration 10] [--clients 1,8,32]

Starts the service twice as a subprocess on 127.0.0.1 (a free port; OMP_NUM_THREADS=1 unless
--server-threads says otherwise): once serving the bundle's guard (model + BaDExpert detector, three
forward passes per input) and once the bare model alone (``serve(..., bare=True)``: the same
application, parsing, micro-batching and logging, with the detector left out). For each number of
concurrent clients (threads with keep-alive HTTP connections, each sending requests of
--request-batch images back to back for --duration seconds after a one-second warm-up), it records
throughput (images/s), p50/p99 latency, failed requests (any answer but a 200 with one result per
image) and the server's mean micro-batch size (from /metrics); and the server's resident memory
(VmRSS) once ready, after all the load, and its peak (VmHWM).

The clients run on the same machine: on a 2-core box they take CPU from the server, so the numbers
are a floor for what a dedicated server does. Images are the Fashion-MNIST test split when the bundle
takes 1x28x28 and the files are there, else seeded random pixels. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def _status_kb(pid: int, key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


class Server:
    """The service in a subprocess; its JSON log goes to a temporary file (read for the port)."""

    def __init__(self, bundle: str, *, bare: bool, threads: int, batch_wait_ms: float, max_batch: int) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        code = ("import sys; from badexpert.serve import Settings, serve; "
                f"serve({bundle!r}, '127.0.0.1', 0, bare={bare}, "
                f"settings=Settings(batch_wait_ms={batch_wait_ms}, max_batch={max_batch}))")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.port = None
        deadline = time.monotonic() + 120
        while self.port is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {Path(self.log.name).read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s")
            for line in Path(self.log.name).read_text().splitlines():
                if '"listening"' in line:
                    self.port = json.loads(line)["port"]
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.05)

    def rss_mb(self) -> float | None:
        kb = _status_kb(self.proc.pid, "VmRSS")
        return None if kb is None else round(kb / 1024, 1)

    def peak_mb(self) -> float | None:
        kb = _status_kb(self.proc.pid, "VmHWM")
        return None if kb is None else round(kb / 1024, 1)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()
            os.unlink(self.log.name)


def _load(port: int, bodies: list[bytes], headers: dict, n_per_request: int, clients: int, seconds: float):
    """``clients`` threads sending back to back until the deadline; latencies (s) and failures."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failed = [0] * clients
    start_flag = threading.Event()
    stop_at = [0.0]

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        k = i
        start_flag.wait()
        while time.perf_counter() < stop_at[0]:
            body = bodies[k % len(bodies)]
            k += clients
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200 and json.loads(data)["n"] == n_per_request
            except Exception:  # noqa: BLE001 - a failed request is counted, the connection rebuilt
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            latencies[i].append(time.perf_counter() - t0)
            if not ok:
                failed[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + seconds
    start_flag.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    return [x for lat in latencies for x in lat], sum(failed), elapsed


def _images(shape: tuple[int, int, int], n: int = 2000) -> tuple[np.ndarray, str]:
    if shape == (1, 28, 28):
        try:
            from badexpert import load_dataset

            _, test = load_dataset("fashion-mnist")
            return test.images[:n].numpy(), "fashion-mnist test split"
        except Exception:  # noqa: BLE001 - fall back to random pixels
            pass
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), "random pixels (seed 0)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="bundle written by `badexpert bundle`")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration (default 10)")
    ap.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients (default 1,8,32)")
    ap.add_argument("--request-batch", type=int, default=1, help="images per request (default 1)")
    ap.add_argument("--format", choices=("raw", "json"), default="raw", help="request body (default raw uint8 bytes)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's --batch-wait-ms (default 5)")
    ap.add_argument("--max-batch", type=int, default=256, help="the server's --max-batch (default 256)")
    ap.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server (default 1)")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    from badexpert.deploy.guard import read_bundle

    meta, _ = read_bundle(args.bundle)
    shape = tuple(meta["detector"]["input_shape"])
    images, source = _images(shape)
    k = args.request_batch
    batches = [images[i:i + k] for i in range(0, len(images) - k + 1, k)]
    if args.format == "raw":
        headers = {"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, (k, *shape)))}
        bodies = [b.tobytes() for b in batches]
    else:
        headers = {"Content-Type": "application/json"}
        bodies = [json.dumps({"inputs": b.tolist(), "dtype": "uint8"}).encode() for b in batches]

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "bundle": {"path": str(args.bundle), "arch": meta["model"]["arch"], "input_shape": list(shape)},
        "load": {"images": source, "format": args.format, "images_per_request": k, "seconds": args.duration,
                 "server_threads": args.server_threads, "batch_wait_ms": args.batch_wait_ms, "max_batch": args.max_batch},
        "results": {},
    }
    for mode in ("guarded", "bare"):
        server = Server(args.bundle, bare=mode == "bare", threads=args.server_threads, batch_wait_ms=args.batch_wait_ms,
                        max_batch=args.max_batch)
        try:
            rss_ready = server.rss_mb()
            runs = {}
            for c in clients:
                _load(server.port, bodies, headers, k, c, 1.0)  # warm-up: connections, allocator
                m0 = _metrics(server.base)
                lat, failed, elapsed = _load(server.port, bodies, headers, k, c, args.duration)
                m1 = _metrics(server.base)
                lat_ms = np.array(lat) * 1000
                forwards = m1["badexpert_batches_total"] - m0["badexpert_batches_total"]
                inputs = m1["badexpert_batch_inputs_total"] - m0["badexpert_batch_inputs_total"]
                runs[str(c)] = {
                    "requests": len(lat), "failed": failed,
                    "images_per_s": round((len(lat) - failed) * k / elapsed, 1),
                    "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat) else None,
                    "p99_ms": round(float(np.percentile(lat_ms, 99)), 2) if len(lat) else None,
                    "mean_server_batch": round(inputs / forwards, 2) if forwards else None,
                }
            runs["rss_mb"] = {"ready": rss_ready, "after": server.rss_mb(), "peak": server.peak_mb()}
            report["results"][mode] = runs
        finally:
            rc = server.stop()
            report["results"].setdefault(mode, {})["exit_status"] = rc
    g, b = report["results"]["guarded"], report["results"]["bare"]
    report["guarded_vs_bare_throughput"] = {str(c): round(g[str(c)]["images_per_s"] / b[str(c)]["images_per_s"], 3)
                                            for c in clients if b[str(c)]["images_per_s"]}
    print(json.dumps(report, indent=2))
    return 0 if all(r[str(c)]["failed"] == 0 for r in (g, b) for c in clients) else 1


if __name__ == "__main__":
    sys.exit(main())
