"""Throughput of the guard in eager PyTorch and as one ONNX graph under onnxruntime.

    OMP_NUM_THREADS=1 python bench/onnx_speed.py --bundle runs/bundle.safetensors [--batch-size 256] [--threads 1]

On the bundle's recorded test split (Fashion-MNIST: the 6,000 test images left after the reserved
and calibration splits), given as uint8 batches, measures images/s of

- ``eager_model``: the bare suspect model in PyTorch (uint8 -> float / 255 -> logits);
- ``eager_guard``: the eager :class:`badexpert.Guard` (model + expert + auxiliary model, score,
  p-value, reject flag and reason);
- ``onnx_model``: the bare model exported alone to ONNX, under onnxruntime;
- ``onnx_guard``: the exported guard graph through :class:`badexpert.runtime.onnx.OnnxGuard`
  (conversion checks, graph, p-values);

and the ratios guard / bare model for each runtime, and the ONNX guard against the bare eager model
(how close it comes to 0.5x of it). Every configuration runs the whole split ``--repeats`` times
after one warm-up pass; the best pass counts. PyTorch and onnxruntime both get ``--threads``
intra-op threads. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _best(fn, batches, repeats: int) -> float:
    """Best wall time of ``repeats`` passes of ``fn`` over ``batches`` (after one warm-up pass)."""
    for b in batches[:2]:
        fn(b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="bundle written by `badexpert bundle`")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and onnxruntime (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-path", default=None, help="dataset files (default: the bundle's record, then the default)")
    args = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from badexpert.data import load_dataset, split
    from badexpert.deploy.export import build_onnx, export_model_onnx
    from badexpert.runtime.onnx import OnnxGuard
    from badexpert.deploy.guard import load_bundle, read_bundle

    torch.set_num_threads(args.threads)
    meta, _ = read_bundle(args.bundle)
    record = meta["detector"].get("extra") or {}
    ds, sp = record.get("dataset") or {}, record.get("split") or {}
    name = ds.get("name") or meta["model"].get("dataset", {}).get("name", "fashion-mnist")
    train_set, test_set = load_dataset(name, args.data_path or ds.get("path"))
    splits = split(train_set, test_set, seed=sp.get("seed", 0), reserved=sp.get("reserved", 2000),
                   calibration=sp.get("calibration", 2000), test_size=sp.get("test_size"))
    images = splits.test.images  # uint8 [N, C, H, W]
    n = len(images)
    bs = args.batch_size
    torch_batches = [images[i : i + bs] for i in range(0, n, bs)]
    np_batches = [b.numpy() for b in torch_batches]

    guard = load_bundle(args.bundle, device="cpu")
    model = guard.model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        guard_path, model_path = Path(tmp) / "guard.onnx", Path(tmp) / "model.onnx"
        guard_path.write_bytes(build_onnx(guard))
        model_path.write_bytes(export_model_onnx(model, guard.input_shape))
        onnx_guard = OnnxGuard(guard_path, providers=["CPUExecutionProvider"], intra_op_threads=args.threads,
                               batch_size=bs)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        bare = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])

    def eager_model(b):
        with torch.no_grad():
            return model(b.float().div_(255))

    def onnx_model(b):
        return bare.run(None, {"images": b.astype(np.float32) / np.float32(255)})

    # sanity: the two runtimes give the same answers on the split
    agree = {
        "labels": float(np.mean(np.concatenate([onnx_guard(b)["label"] for b in np_batches])
                                == torch.cat([guard(b).label for b in torch_batches]).numpy())),
        "reject": float(np.mean(np.concatenate([onnx_guard(b)["reject"] for b in np_batches])
                                == torch.cat([guard(b).reject for b in torch_batches]).numpy())),
    }
    seconds = {
        "eager_model": _best(eager_model, torch_batches, args.repeats),
        "eager_guard": _best(guard, torch_batches, args.repeats),
        "onnx_model": _best(onnx_model, np_batches, args.repeats),
        "onnx_guard": _best(onnx_guard, np_batches, args.repeats),
    }
    ips = {k: round(n / v, 1) for k, v in seconds.items()}
    result = {
        "bundle": str(args.bundle),
        "images": n,
        "batch_size": bs,
        "threads": args.threads,
        "repeats": args.repeats,
        "images_per_s": ips,
        "guard_over_model": {
            "eager": round(ips["eager_guard"] / ips["eager_model"], 3),
            "onnx": round(ips["onnx_guard"] / ips["onnx_model"], 3),
        },
        "onnx_guard_over_eager_model": round(ips["onnx_guard"] / ips["eager_model"], 3),
        "onnx_guard_over_eager_guard": round(ips["onnx_guard"] / ips["eager_guard"], 3),
        "target_onnx_guard_over_eager_model": 0.5,
        "agreement_on_split": agree,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
