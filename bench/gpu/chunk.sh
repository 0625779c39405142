#!/usr/bin/env bash
# One chunk of a grid on the GPU machine, ending inside the device tool's 10-minute call:
#   run(command="bash bench/gpu/chunk.sh", carry=[".cache/gpu"], timeout_s=600)
# (after `bash bench/gpu/pack.sh` here). It unpacks CIFAR-10 to a fixed path and checks its SHA-256
# (the grid's row keys hash the dataset's content, so every chunk, on any machine, keys its rows
# as this machine does), runs `badexpert grid --time-budget` and copies results.jsonl and the summaries
# to $OUT. Copy them back into bench/results/<name>/ and commit: the next chunk, on the next
# machine, resumes from the rows there. Suspect models and training checkpoints stay on the
# machine (a full-width ResNet-18 is over the 16 MiB a returned file may hold), so a chunk must
# finish the cells it starts or lose them: the budget sees to that.
#
# Environment: CONFIG (default configs/grids/paper-cifar10-gpu.json), BUDGET seconds (default
# 480), RESULTS (default bench/results/<config name>), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-configs/grids/paper-cifar10-gpu.json}
BUDGET=${BUDGET:-480}
NAME=$(basename "$CONFIG" .json)
RESULTS=${RESULTS:-bench/results/$NAME}
PY=${PYTHON:-python3}
DATA=/tmp/badexpert-gpu/cifar10-jpeg.zip
SHA=af1c022d39961e17aaaf2017bef65909f6376985b8d7f3b5e777da505470910a

mkdir -p /tmp/badexpert-gpu
if [ ! -f "$DATA" ]; then
  xz -dc .cache/gpu/cifar10-jpeg.zip.xz > "$DATA.part" || { echo "chunk.sh: run bench/gpu/pack.sh first" >&2; exit 2; }
  echo "$SHA  $DATA.part" | sha256sum -c --quiet || { rm -f "$DATA.part"; echo "chunk.sh: unpacked CIFAR-10 differs" >&2; exit 2; }
  mv "$DATA.part" "$DATA"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import badexpert, torch; print('badexpert', badexpert.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$RESULTS"
"$PY" -m badexpert grid --config "$CONFIG" --out "$RESULTS" --cache-dir /tmp/badexpert-gpu/cache --time-budget "$BUDGET" \
  2>&1 | tee /tmp/badexpert-gpu/grid.log
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  for f in results.jsonl summary.md summary.csv matrix.md grid.json; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
  cp /tmp/badexpert-gpu/grid.log "$OUT/"
fi
echo "chunk.sh: grid exit status $rc (0: the grid is complete; 3: work left, run the next chunk)"
[ "$rc" = 0 ] || [ "$rc" = 3 ]
