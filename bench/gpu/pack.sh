#!/usr/bin/env bash
# Pack what the GPU run needs beyond the working tree into .cache/gpu (an ignored folder that the
# device tool carries): CIFAR-10 as the shared JPEG zip compressed with xz (65 MB -> about 19 MB,
# lossless: chunk.sh checks the zip's SHA-256 after unpacking).
#   bash bench/gpu/pack.sh [path/to/cifar10-jpeg.zip]
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-../shared/data/cifar10-jpeg.zip}
mkdir -p .cache/gpu
xz -T1 -6 -c "$SRC" > .cache/gpu/cifar10-jpeg.zip.xz.part
mv .cache/gpu/cifar10-jpeg.zip.xz.part .cache/gpu/cifar10-jpeg.zip.xz
ls -l .cache/gpu
