"""Speed of badexpert's architectures in the usual and the channels-last memory layout.

    OMP_NUM_THREADS=1 python bench/train_layout.py [--steps 8] [--batch-size 128] [--threads 1]

For each architecture at the width the grids train it (ResNet-18, VGG-16-BN and MobileNetV2 at 8,
the ViT at 64 on 32x32 RGB; the CNN at 16 on 28x28 grey), times ``--steps`` SGD steps of
:func:`badexpert.training.train` on random images, and ``--steps`` passes of a batch through the
model in eval mode (a forward pass, as a detector scores, and a forward and backward pass to the
input, as CD and the clean-label attack do), once inside ``channels_last(False)`` (the usual layout)
and once inside ``channels_last(True)`` (what a CPU uses by default), after a warm-up each; the
runs alternate ``--repeats`` times and the best of each counts. Prints one JSON object: seconds
per step or pass in each layout and the speed-ups.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time

import torch

from badexpert.models import build_model
from badexpert.training import Recipe, channels_last, train

#: (arch, width, channels, image size): the settings the grid configs train.
SETTINGS = (("resnet18", 8, 3, 32), ("vgg16bn", 8, 3, 32), ("mobilenetv2", 8, 3, 32), ("vit", 64, 3, 32),
            ("cnn", 16, 1, 28))


def seconds_per_step(arch: str, width: int, c: int, size: int, *, steps: int, batch_size: int, layout: bool) -> float:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=c, num_classes=10, image_size=size, width=width)
    x = torch.rand(batch_size * (steps + 1), c, size, size)
    y = torch.randint(0, 10, (len(x),))
    warm = Recipe(epochs=1, batch_size=batch_size, max_steps=1, augment=False)
    timed = Recipe(epochs=1, batch_size=batch_size, max_steps=steps, augment=False)
    with channels_last(layout):
        train(model, (x[:batch_size], y[:batch_size]), warm, desc="warm-up")
        t0 = time.perf_counter()
        train(model, (x, y), timed, desc="timed")
    return (time.perf_counter() - t0) / steps


def seconds_per_pass(arch: str, width: int, c: int, size: int, *, steps: int, batch_size: int, layout: bool,
                     backward: bool) -> float:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=c, num_classes=10, image_size=size, width=width).eval()
    x = torch.rand(batch_size, c, size, size)

    def one() -> None:
        with torch.set_grad_enabled(backward):
            xr = x.clone().requires_grad_(backward)
            out = model(xr)
            if backward:
                torch.autograd.grad(out.logsumexp(1).sum(), xr)

    with channels_last(layout):
        one()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"machine": f"{platform.platform()}, {platform.processor() or 'cpu'}", "torch": torch.__version__,
           "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps, "archs": {}}
    for arch, width, c, size in SETTINGS:
        timers = {"train": lambda layout: seconds_per_step(arch, width, c, size, steps=args.steps,
                                                           batch_size=args.batch_size, layout=layout)}
        for name, backward in (("forward", False), ("forward_backward", True)):
            timers[name] = functools.partial(seconds_per_pass, arch, width, c, size, steps=args.steps,
                                             batch_size=args.batch_size, backward=backward)
        row = {}
        for name, timer in timers.items():
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeats):
                for layout in (False, True):
                    best[layout] = min(best[layout], timer(layout=layout))
            row[name] = {"usual_s": round(best[False], 4), "channels_last_s": round(best[True], 4),
                         "speedup": round(best[False] / best[True], 2)}
        out["archs"][f"{arch}-w{width}"] = row
        print(f"{arch}-w{width}: {out['archs'][f'{arch}-w{width}']}", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
