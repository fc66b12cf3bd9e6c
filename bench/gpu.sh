#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call on a lent GPU machine (see
# docs/DEVELOPING.md, "When a GPU is lent"): generation at 50 and 20 steps on the
# stable-diffusion-2-1-base architecture, the GPU tests (tests/gpu), fine-tuning throughput
# (issue 22: the plain DreamBooth loop against models.finetune.train), the own generator's
# training time projected from each stage's steps (issue 24), the classifier grid with
# and without the feature cache, then the backbone alone. Most important first, each step under
# its own time limit, and every number written under $OUT as soon as it exists, so a call cut
# short still returns what finished (the limits add up to more than a call's 600 s; steps
# usually end well inside theirs, and a long call loses the last, least important one). Wheels
# in .whl/ (what the device image lacks) are installed first; the classifier's photos come from
# .benchdata/ (python -m bench.classifier --save-data .benchdata).
#
#   bash bench/gpu.sh                       # on the device: DEVICE=cuda
#   DEVICE=cpu SMOKE=1 bash bench/gpu.sh    # a rehearsal here: tiny sizes, every step runs
set -u
OUT=${OUT:-var/gpu-bench}
DEVICE=${DEVICE:-cuda}
export SYNTHDERM_GPU_TEST_DEVICE=$DEVICE PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu-bench.log"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi

step() {  # step NAME SECONDS COMMAND...: run it, log it, say how it ended
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'cuda', torch.cuda.is_available())"; } | tee -a "$LOG"

if [ "${SMOKE:-0}" = 1 ]; then
  GEN=(--arch tiny --images 4 --baseline-images 2 --batch 2)
  CLS=(--seeds 1 --max-epochs 2 --k 1,2,3,4)
  BACKBONE=(--batch 8 --seconds 1)
  TUNE=(--arch tiny --images 8 --epochs 2)
  SCRATCH=(--steps 4 --images 32)
else
  GEN=(--arch sd21 --images 256 --baseline-images 16 --batch 16)
  CLS=(--seeds 1)
  BACKBONE=(--batch 8,64 --seconds 4)
  TUNE=(--arch sd21 --images 12 --batch 4 --epochs 6)
  SCRATCH=(--steps 12 --images 256)
fi
step gen50 230 python3 -m bench.generation --steps 50 "${GEN[@]}" --json "$OUT/gen50.json"
step gen20 80 python3 -m bench.generation --steps 20 "${GEN[@]}" --json "$OUT/gen20.json"
step gpu-tests 60 python3 -m pytest --noconftest tests/gpu
step finetune 90 python3 -m bench.finetune --device "$DEVICE" "${TUNE[@]}" \
  --json "$OUT/finetune.json"
step scratch 60 python3 -m bench.scratch --device "$DEVICE" "${SCRATCH[@]}" \
  --json "$OUT/scratch.json"
step classifier 170 python3 -m bench.classifier --data .benchdata --device "$DEVICE" \
  "${CLS[@]}" --json "$OUT/classifier.json"
step backbone 25 python3 -m bench.backbone --device "$DEVICE" "${BACKBONE[@]}" \
  --json "$OUT/backbone.json"
