"""Shared fixtures: a tiny synthetic image task on which a real backdoor is implanted in seconds."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from badexpert.data import Dataset

os.environ.setdefault("BADEXPERT_QUIET", "1")
if "OMP_NUM_THREADS" not in os.environ:  # respect an explicit thread budget (shared machines)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@contextmanager
def bounded_memory(limit_mb: int):
    """Assert that the block's peak resident memory rises less than ``limit_mb`` above the
    resident memory before it (Linux: the peak is reset through ``/proc/self/clear_refs``; where
    that is not possible, only this assertion is skipped)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _proc_status_kb("VmRSS")
    except OSError:
        before = None
    yield
    peak = _proc_status_kb("VmHWM") if before is not None else None
    if peak is not None:
        grew = peak - before
        assert grew < limit_mb * 1024, f"peak memory rose {grew / 1024:.0f} MB above the RSS before (limit {limit_mb} MB)"


def make_blobs(n: int, seed: int, size: int = 12, classes: int = 4) -> Dataset:
    """``classes`` classes of ``size`` x ``size`` grayscale images: class k has a bright bar at
    row band k, on noise. Learnable by a tiny CNN in a couple of epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.rand(n, 1, size, size, generator=g) * 0.35
    band = size // classes
    for k in range(classes):
        idx = (labels == k).nonzero().flatten()
        x[idx, :, k * band : (k + 1) * band, 1:-4] += 0.55
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return Dataset(images=images, labels=labels, classes=[f"c{k}" for k in range(classes)], name="blobs", hflip=False)


@pytest.fixture(scope="session")
def blobs():
    """(train, test) synthetic datasets."""
    return make_blobs(3000, seed=1), make_blobs(2400, seed=2)


@pytest.fixture(scope="session")
def backdoored(blobs):
    """A tiny CNN trained on blobs poisoned by a BadNet patch (target 0): (model, attack, train, test)."""
    from badexpert.attacks import get_attack
    from badexpert.models import build_model
    from badexpert.training import Recipe, train
    from badexpert.utils import derive_generator, seed_everything

    tr, te = blobs
    seed_everything(0)
    attack = get_attack("badnet", target=0, poison_rate=0.05)
    poisoned = attack.poison(tr, derive_generator(0, "poison"))
    model = build_model("cnn", in_channels=1, num_classes=4, image_size=12, mean=tr.mean, std=tr.std, width=8)
    train(model, poisoned, Recipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=64, weight_decay=0,
                                  schedule="cosine", augment=False), seed=0)
    return model.eval(), attack, tr, te


def attack_files(folder: Path, cls, *, optional: bool = True) -> dict:
    """Parameters naming example files for an attack class (a folder of reflection images, which
    it needs; a trigger image, which it may take unless ``optional=False``), decided from its
    fields, not its name."""
    from PIL import Image

    params = {}
    if "reflections" in cls.__dataclass_fields__:
        (folder / "refl").mkdir(parents=True)
        g = torch.Generator().manual_seed(0)
        for i in range(6):
            arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(folder / "refl" / f"r{i}.png")
        params["reflections"] = str(folder / "refl")
    if optional and "trigger_image" in cls.__dataclass_fields__ and cls.__dataclass_fields__["trigger_image"].default is None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(5, 5, 3, generator=torch.Generator().manual_seed(1)) * 255)
                        .to(torch.uint8).numpy()).save(folder / "trigger.png")
        params["trigger_image"] = str(folder / "trigger.png")
    return params


def prepared(attack, shape):
    """``attack`` ready to trigger images of ``shape``: a learned attack (a generator, an encoder,
    an optimised pattern) gets its seeded initial state, so its machinery is exercised without
    training; others build their trigger from their parameters as usual."""
    if attack.learned:
        attack.restore_state(shape, attack.initial_state(shape), source="its initial state")
    return attack


def random_dataset(n: int = 400, c: int = 3, size: int = 32, classes: int = 10, seed: int = 0) -> Dataset:
    """``n`` uniform-noise uint8 images with labels cycling through ``classes``: for the
    mechanics tests of attacks (where and how a trigger lands, which samples are chosen)."""
    g = torch.Generator().manual_seed(seed)
    return Dataset(images=torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8),
                   labels=torch.arange(n) % classes, classes=[str(i) for i in range(classes)], name="rand")


def write_blobs(root: Path, n_train: int = 100, n_test: int = 80, size: int = 12, classes: int = 4) -> Path:
    """An ImageFolder (``train/<class>/*.png``, ``test/<class>/*.png``): class k is a bright bar at
    row band k on noise, learnable by a tiny CNN in a second."""
    r = np.random.default_rng(0)
    band = size // classes
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(classes):
            d = root / split / f"c{k}"
            d.mkdir(parents=True)
            for i in range(n):
                x = r.random((size, size)) * 0.35
                x[k * band:(k + 1) * band, 1:-4] += 0.55
                Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def served_bundle(backdoored, directory: Path, name: str = "guard") -> dict:
    """A real bundle ``<directory>/<name>.safetensors`` for the service tests: the tiny backdoored
    CNN of ``backdoored`` with BaDExpert calibrated at 5% FPR, the guard loaded from it, clean test
    images and their triggered copies (uint8)."""
    from badexpert import BaDExpert, load_bundle, save_bundle

    model, attack, tr, te = backdoored
    reserved, calib, test = te.subset(range(0, 800)), te.subset(range(800, 1600)), te.subset(range(1600, 2400))
    det = BaDExpert(expert_lr=1e-2, aux_lr=0.1, aux_epochs=4, seed=0).fit(model, reserved).calibrate(calib, fpr=0.05)
    meta = {"arch": "cnn", "width": 8, "in_channels": 1, "num_classes": 4, "image_size": [12, 12],
            "mean": list(tr.mean), "std": list(tr.std), "classes": list(tr.classes)}
    path = save_bundle(directory / f"{name}.safetensors", model, det, meta)
    guard = load_bundle(path)
    mask = attack.counts(test.labels)
    trig = (attack.apply(test.images[mask]) * 255).round().to(torch.uint8)
    return {"path": path, "guard": guard, "clean": test.images, "trig": trig, "classes": list(tr.classes)}


@contextmanager
def service_client(guard, ready: str, **settings):
    """A FastAPI TestClient on the service of ``guard`` (``Settings(**settings)``), once ``ready``
    (a readiness route) answers 200, within 20 s."""
    import time
    import warnings

    from badexpert.serve import Settings, create_app

    with warnings.catch_warnings():  # starlette 1.x: "install httpx2" (TestClient still uses httpx)
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    with TestClient(create_app(guard, settings=Settings(**settings))) as c:
        deadline = time.monotonic() + 20
        while c.get(ready).status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.01)
        yield c


class _Served:
    port: int | None = None

    def __init__(self) -> None:
        self.lines: list[str] = []


@contextmanager
def serve_process(bundle, *args: str):
    """``badexpert serve BUNDLE --port 0 ARGS`` in a subprocess on 127.0.0.1 (one PyTorch thread):
    yields once it logged its port (``.port``; its JSON log lines in ``.lines``, read as they come
    so the pipe never fills); then SIGTERM, and the service must exit with status 0."""
    import json
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "badexpert.cli", "serve", str(bundle), "--port", "0", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    served, found = _Served(), threading.Event()

    def pump():
        for line in proc.stderr:
            served.lines.append(line)
            if served.port is None and '"listening"' in line:
                served.port = json.loads(line)["port"]
                found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(served.lines)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        reader.join(5)
    assert rc == 0, "".join(served.lines)


def train_blobs_model(root: Path) -> tuple[Path, Path]:
    """``badexpert train`` of a BadNet-backdoored CNN (width 8, 10% poisoning) on the tiny ImageFolder
    of :func:`write_blobs` under ``root``: returns (the ImageFolder, the model file)."""
    from badexpert.cli import main

    data = write_blobs(root / "data")
    model = root / "model.safetensors"
    assert main(["train", "--dataset", "imagefolder", "--data-path", str(data), "--arch", "cnn", "--width", "8",
                 "--attack", "badnet", "--poison-rate", "0.1", "--epochs", "8", "--lr", "0.003", "--optimizer", "adam",
                 "--batch-size", "32", "--reserved", "80", "--calibration", "80", "--device", "cpu",
                 "--out", str(model)]) == 0
    return data, model

