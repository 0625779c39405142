"""What the whole-file checks of a bundle cost on its load time (hardening II, classes 1, 2, 5, 6).

    OMP_NUM_THREADS=1 python bench/bundle_checks.py [--bundle guard.safetensors] [--arch cnn --width 16]

Without ``--bundle`` a bundle is built on the fly: a randomly initialised model of ``--arch`` on
28x28 greyscale images with 10 named classes, and a BaDExpert detector fitted (one short epoch)
and calibrated (200 images, FPR 0.05) on random images; the checks do not depend on what the
weights learned. Measures, best of ``--repeats`` after one warm-up call:

- ``load_bundle`` and ``read_bundle`` (the one whole-file check ``serve``, ``export`` and
  ``info`` share);
- each check added by hardening II on its own: the bounded metadata reader (size, depth, UTF-8)
  over the bundle's metadata, the field checks (types, class names against the model), the
  memory estimate of a batch of the declared input shape (on PyTorch's meta device) and the
  calibration record (scores finite and as declared, the threshold one of them);
- their sum as a share of ``load_bundle``.

Prints one JSON object; record it in bench/RESULTS.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardening import best_of  # noqa: E402  (bench/hardening.py: best of N runs after a warm-up)


def build_bundle(path: Path, arch: str, width: int | None) -> Path:
    from badexpert import BaDExpert, save_bundle
    from badexpert.models import build_model

    torch.manual_seed(0)
    meta = {"arch": arch, "width": width, "in_channels": 1, "num_classes": 10, "image_size": [28, 28],
            "mean": [0.5], "std": [0.5], "classes": [f"class{i}" for i in range(10)]}
    model = build_model(arch, in_channels=1, num_classes=10, image_size=28, width=width, mean=[0.5], std=[0.5]).eval()
    g = torch.Generator().manual_seed(0)
    fit = (torch.randint(0, 256, (100, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(100) % 10)
    cal = (torch.randint(0, 256, (200, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(200) % 10)
    det = BaDExpert(preset="paper", expert_lr=1e-2, aux_lr=0.1, aux_epochs=1, expert_batch_size=50,
                    aux_batch_size=50, augment=False, seed=0)
    det.fit(model, fit).calibrate(cal, fpr=0.05, population="all")
    return save_bundle(path, model, det, meta)


def measure(bundle: Path, repeats: int) -> dict:
    from safetensors import safe_open

    from badexpert.detectors.base import check_record
    from badexpert.deploy.guard import BUNDLE_MODEL_TYPES, load_bundle, read_bundle
    from badexpert.io import MODEL_META_TYPES, check_architecture
    from badexpert.limits import DEPLOY_BATCH
    from badexpert.metadata import check_classes, check_fields, parse_metadata

    with safe_open(str(bundle), framework="pt") as fh:
        text = fh.metadata()["badexpert"]
    meta, tensors = read_bundle(bundle)
    model, det = meta["model"], meta["detector"]
    shapes = {k[len("model."):]: tuple(v.shape) for k, v in tensors.items() if k.startswith("model.")}
    det_state = {k[len("detector."):]: v for k, v in tensors.items() if k.startswith("detector.")}

    def fields():
        m = copy.deepcopy(model)
        check_fields(m, {**MODEL_META_TYPES, **BUNDLE_MODEL_TYPES}, "bench")
        check_classes(m.get("classes"), m["num_classes"], "bench")

    checks = {
        "metadata_reader_s": best_of(lambda: parse_metadata(text, "bench"), repeats),
        "field_checks_s": best_of(fields, repeats),
        # the architecture check without and with the memory estimate (the same meta-device model)
        "memory_estimate_s": best_of(lambda: check_architecture(model, shapes, "bench", batch=DEPLOY_BATCH), repeats)
        - best_of(lambda: check_architecture(model, shapes, "bench"), repeats),
        "calibration_record_s": best_of(lambda: check_record(det_state, det, "bench"), repeats),
    }
    load = best_of(lambda: load_bundle(bundle), repeats)
    added = sum(checks.values())
    return {
        "bundle_bytes": bundle.stat().st_size, "metadata_bytes": len(text.encode()), "arch": model["arch"],
        "calibration_scores": int(det["calibration_size"]), "threads": torch.get_num_threads(),
        "load_bundle_s": load, "read_bundle_s": best_of(lambda: read_bundle(bundle), repeats),
        "new_checks": checks, "new_checks_total_s": added, "new_checks_share_of_load": added / load,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="a bundle written by `badexpert bundle` (default: build one, see above)")
    p.add_argument("--arch", default="cnn", help="architecture of the bundle built on the fly (default cnn)")
    p.add_argument("--width", type=int, default=16, help="its width (default 16)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    result = {"machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                          "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        bundle = Path(args.bundle) if args.bundle else build_bundle(Path(tmp) / "guard.safetensors", args.arch,
                                                                    args.width)
        if not args.bundle:
            result["build_s"] = time.perf_counter() - t
        from badexpert.deploy.guard import load_bundle

        t = time.perf_counter()
        load_bundle(bundle)  # the first load of the process: imports and PyTorch's one-time set-up included
        result["first_load_bundle_s"] = time.perf_counter() - t
        result.update(measure(bundle, args.repeats))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
