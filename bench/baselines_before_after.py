"""AUROC of baseline detectors on small Fashion-MNIST models, for before/after comparisons.

    OMP_NUM_THREADS=1 python bench/baselines_before_after.py cd,sentinet,teco badnet,trojan,blend \
        [--cache .cache/baselines] [DETECTOR.KEY=JSON ...]

Trains (once; cached as safetensors in ``--cache``) a CNN of width 16 on the first 20,000
Fashion-MNIST training images poisoned by each attack (target 0; BadNet and Trojan at 1%, Blend
at 2%, SIG at 5%; Adam 3e-3, 4 epochs, cosine, no augmentation, seed 0), fits each detector on
test images 0-299, and scores test images 1000-1299 against their first 300 triggered copies
(inputs of the target class left out). Prints CA, ASR and each detector's AUROC (clean against
triggered, every input). The same command run with another version of the package on
``PYTHONPATH`` (a git worktree of an older commit) gives the "before" column; the models are the
same since training does not depend on the detectors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from badexpert.attacks import get_attack
from badexpert.data import load_dataset, to_float
from badexpert.detectors import get_detector
from badexpert.metrics import auroc
from badexpert.models import build_model
from badexpert.training import Recipe, forward, train
from badexpert.utils import derive_generator, seed_everything

POISON_RATES = {"badnet": 0.01, "trojan": 0.01, "blend": 0.02, "sig": 0.05}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("detectors")
    ap.add_argument("attacks")
    ap.add_argument("params", nargs="*", help="DETECTOR.KEY=JSON detector parameters")
    ap.add_argument("--cache", default=".cache/baselines", help="where the trained models are kept")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params: dict[str, dict] = {}
    for kv in args.params:
        key, value = kv.split("=", 1)
        det, name = key.split(".", 1)
        params.setdefault(det, {})[name] = json.loads(value)
    from safetensors.torch import load_file, save_file

    tr, te = load_dataset("fashion-mnist")
    tr = tr.subset(range(0, 20000))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for a in args.attacks.split(","):
        attack = get_attack(a, target=0, poison_rate=POISON_RATES.get(a, 0.02))
        seed_everything(0)  # the model's initial weights too
        model = build_model("cnn", in_channels=1, num_classes=10, image_size=28, mean=tr.mean, std=tr.std, width=16)
        path = cache / f"model_{a}.safetensors"
        if path.exists():
            model.load_state_dict(load_file(str(path)))
        else:
            poisoned = attack.poison(tr, derive_generator(0, "poison"))
            t = time.time()
            train(model, poisoned, Recipe(optimizer="adam", lr=3e-3, epochs=4, batch_size=128, weight_decay=0,
                                          schedule="cosine", augment=False), seed=0)
            print(f"trained {a} in {time.time() - t:.0f}s", flush=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        model.eval()
        fit, clean = te.subset(range(0, 300)), te.subset(range(1000, 1300))
        trig = attack.apply(clean.images[attack.counts(clean.labels)][:300])
        with torch.no_grad():
            ca = (forward(model, to_float(clean.images)).argmax(1) == clean.labels).float().mean().item()
            asr = (forward(model, to_float(trig)).argmax(1) == 0).float().mean().item()
        print(f"{a}: CA {ca:.3f} ASR {asr:.3f}", flush=True)
        for d in args.detectors.split(","):
            det = get_detector(d, seed=0, **params.get(d, {})).fit(model, fit)
            t = time.time()
            sc, st = det.score(clean.images), det.score(trig)
            print(f"  {d} {params.get(d, {})}: AUROC {auroc(sc.numpy(), st.numpy()):.3f} ({time.time() - t:.0f}s)",
                  flush=True)


if __name__ == "__main__":
    main()
