"""What the input checks cost, and what hostile files now take.

    python bench/hardening.py --model runs/model.safetensors [--cifar ../shared/data/cifar10-jpeg.zip]

Measures, on one process (run it with OMP_NUM_THREADS=1 on a quiet machine):

- detector scoring throughput on 6,000 Fashion-MNIST test images given as uint8, as float32 in
  [0, 1] (range-checked) and as float32 with one NaN pixel per 100 images (rejected unscored),
  against the bare model, with a detector fitted on the model's reserved split;
- dataset loading time of the CIFAR-10 ImageFolder zip (header pass + checked decoding);
- peak memory (VmHWM rise, Linux) while refusing or loading hostile files written on the fly:
  a zip whose first image is 2000x2000 followed by 8x8 images, a gzip IDX whose header declares
  10^5 x 10^4 x 10^4 bytes, a 12000x12000 PNG.

Prints one JSON object; record it in bench/RESULTS.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import re
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import torch


def _hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_rise_mb(fn) -> tuple[float, str]:
    """Run ``fn``; the rise of peak RSS over the RSS before, in MB, and what it raised (if anything)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan"), "peak RSS cannot be reset here"
    before = _rss_kb()
    outcome = "loaded"
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported, not handled
        outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
    return (_hwm_kb() - before) / 1024, outcome


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def scoring(model_path: str) -> dict:
    from badexpert import BaDExpert, load_model
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits

    model, meta = load_model(model_path)
    sp = meta["split"]
    splits = make_splits(ExperimentConfig(dataset=meta["dataset"]["name"], data_path=meta["dataset"].get("path"),
                                          reserved=sp["reserved"], calibration=sp["calibration"], seed=sp["seed"]))
    det = BaDExpert(seed=0).fit(model, splits.reserved).calibrate(splits.calibration, 0.01)
    x8 = splits.test.images
    xf = x8.float() / 255
    xnan = xf.clone()
    xnan[::100, :, 0, 0] = float("nan")
    n = len(x8)

    def bare():
        with torch.no_grad():
            for i in range(0, n, 256):
                model(xf[i : i + 256]).argmax(1)

    out = {"images": n, "threads": torch.get_num_threads(), "bare_model_img_s": n / best_of(bare)}
    for name, x in (("uint8", x8), ("float", xf), ("float_1pct_nan", xnan)):
        out[f"detector_{name}_img_s"] = n / best_of(lambda x=x: det.predict(x))
    out["nan_rejected"] = int(det.predict(xnan)[::100].sum())
    return out


def hostile_files(tmp: Path) -> dict:
    from PIL import Image

    from badexpert import load_dataset

    out = {}
    # a zip whose first image is 2000x2000, then 200 8x8 images (train) and 50 (test)
    z = tmp / "big-first.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        buf = io.BytesIO()
        Image.new("L", (2000, 2000), 128).save(buf, "PNG")
        zf.writestr("train/a/0000.png", buf.getvalue())
        small = io.BytesIO()
        Image.new("L", (8, 8), 60).save(small, "PNG")
        for split, count in (("train", 200), ("test", 50)):
            for i in range(1, count + 1):
                zf.writestr(f"{split}/{'ab'[i % 2]}/{i:04d}.png", small.getvalue())
    out["zip_2000px_first_then_8px"] = dict(zip(("peak_rise_mb", "outcome"), peak_rise_mb(
        lambda: load_dataset("imagefolder", z))), file_kb=z.stat().st_size // 1024)
    # gzip IDX whose header declares 10^5 x 10^4 x 10^4 bytes, followed by 64 MiB of zeros
    d = tmp / "fmnist"
    d.mkdir()
    header = struct.pack(">BBBBIII", 0, 0, 8, 3, 10**5, 10**4, 10**4)
    with gzip.open(d / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header)
        for _ in range(64):
            fh.write(bytes(1024**2))
    (d / "train-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10**5) + bytes(10**5))
    (d / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 1, 10**4, 10**4) + bytes(10**8))
    (d / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 1) + bytes(1))
    out["gzip_idx_declaring_10TB"] = dict(zip(("peak_rise_mb", "outcome"), peak_rise_mb(
        lambda: load_dataset("fashion-mnist", d))), file_kb=(d / "train-images-idx3-ubyte.gz").stat().st_size // 1024)
    # a 12000x12000 PNG (one grey level), written row by row without holding the pixels
    png = tmp / "huge.png"
    raw = zlib.compressobj(9)
    body = b"".join(raw.compress(b"\x00" + bytes(12000)) for _ in range(12000)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    from badexpert.data.imagefolder import open_image

    out["png_12000x12000"] = dict(zip(("peak_rise_mb", "outcome"), peak_rise_mb(lambda: open_image(png))),
                                  file_kb=png.stat().st_size // 1024)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Fashion-MNIST model written by `badexpert train` (scoring throughput)")
    p.add_argument("--cifar", help="the CIFAR-10 ImageFolder zip (load time)")
    args = p.parse_args(argv)
    result = {"machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                          "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        result["hostile_files"] = hostile_files(Path(tmp))
    if args.cifar:
        from badexpert import load_dataset

        t = time.perf_counter()
        tr, te = load_dataset("cifar10", args.cifar)
        result["cifar10_zip_load_s"] = time.perf_counter() - t
        result["cifar10_sizes"] = [len(tr), len(te)]
    if args.model:
        result["scoring"] = scoring(args.model)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
