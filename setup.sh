#!/usr/bin/env bash
# Install everything badexpert needs on a fresh machine: PyTorch (pinned CPU build unless one is
# already installed), the Fashion-MNIST files (Debian package, when apt-get is usable) and the
# package itself with its test, serve (FastAPI, uvicorn), export (onnx, onnxruntime; also the ONNX
# model source), grid, hf (transformers: Hugging Face model sources) and docs (Sphinx, MyST, furo:
# the documentation site) extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# PyTorch first and pinned, so pip never resolves an unpinned torch (which pulls gigabytes of CUDA
# packages). Set TORCH_VERSION to pick another build; install your GPU build yourself beforehand.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi

# Fashion-MNIST, the embedded default dataset: /usr/share/datasets/fashion-mnist
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup.sh: warning: could not install dataset-fashion-mnist; pass --data-path to the IDX files" >&2
  else
    echo "setup.sh: Fashion-MNIST not found; install the Debian package dataset-fashion-mnist or pass --data-path" >&2
  fi
fi

"$PY" -m pip install --quiet -e ".[test,serve,export,grid,hf,docs]"
echo "setup.sh: done. Try: badexpert demo --out runs/demo"
