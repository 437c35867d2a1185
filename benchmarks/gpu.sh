#!/usr/bin/env bash
# What runs on the lent GPU (through the device tool), so the results can be repeated on any CUDA machine.
#
#   bash benchmarks/gpu.sh world                  # the 8B-shapes world: 4-bit model, its bf16 original, reward model
#   bash benchmarks/gpu.sh generation [ARGS]      # generation records: greedy answers at batch 32/64, the chat
#   bash benchmarks/gpu.sh rl-step                # an RL step split, uncapped, then capped at BENCH_MEMORY_CAP_GIB
#   bash benchmarks/gpu.sh notebooks 01 02 03     # the notebooks on the 8B shapes, capped (one record each)
#   bash benchmarks/gpu.sh lanes "01 02 03 04 05" 06 07  # the same, each quoted lane in parallel with its own
#                                                 # outputs (a lane trains the stages it needs): minutes saved on a
#                                                 # card with room for several capped processes; times overlap
#   bash benchmarks/gpu.sh bench NAME --paths ... # benchmarks/bench_training.py, every path in its own process
#
# Settings: OUT (results folder, default benchmarks/results), WORLD (default /tmp/shapes-world),
# BENCH_MEMORY_CAP_GIB (default 38.8: an A100 40 GB's 40 GiB less the CUDA context), TUTORIAL_PROFILE (default
# quick), TUTORIAL_OUTPUTS (default /tmp/tutorial-outputs), BENCH_ROWS (rows of each dataset, 600), BENCH_MAX_STEPS
# (steps a stage, 3), BENCH_NEW_TOKENS (tokens an answer, 64).
#
# The GPU image lacks trl, datasets, bitsandbytes and unsloth: `bash ../shared/gpu/make-bundle.sh .gpu` builds them
# into .gpu/gpu-site.tgz; the notebooks also need the wheels in .whl/ (nbclient, ipykernel, wandb, gguf, the
# benchmark checkers, ...). Results go to $OUT.
set -euo pipefail
stage="${1:?world, generation, rl-step, notebooks or bench}"
out="${OUT:-benchmarks/results}"
world="${WORLD:-/tmp/shapes-world}"
cap="${BENCH_MEMORY_CAP_GIB:-38.8}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -f .gpu/gpu-site.tgz ] && [ ! -f /tmp/site/.unpacked ]; then
  mkdir -p /tmp/site && tar xzf .gpu/gpu-site.tgz -C /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  touch /tmp/site/.unpacked
fi
export PYTHONPATH="/tmp/site:$PWD" JUPYTER_PATH=/tmp/site/share/jupyter HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export TUTORIAL_PROFILE="${TUTORIAL_PROFILE:-quick}" TUTORIAL_BACKEND=unsloth
export TUTORIAL_OUTPUTS="${TUTORIAL_OUTPUTS:-/tmp/tutorial-outputs}"
export TUTORIAL_SETTINGS="${TUTORIAL_SETTINGS:-/tmp/shapes-settings.json}"

if [ ! -f "$world/reward-model-3b-bf16/config.json" ]; then
  start=$SECONDS
  python3 benchmarks/shapes.py --out "$world" --model --reward-model --sft-rows 1300 --preference-rows 1300 >/dev/null
  echo "world built in $((SECONDS - start)) s"
fi
python3 benchmarks/shapes.py --out "$world" --settings "$TUTORIAL_SETTINGS" --max-rows "${BENCH_ROWS:-600}" \
  --max-steps "${BENCH_MAX_STEPS:-3}" --max-new-tokens "${BENCH_NEW_TOKENS:-64}" >/dev/null
python3 -c "import wandb" 2>/dev/null || python3 -c "
import json, sys
settings = json.load(open(sys.argv[1])) | {'report_to_wandb': False}
json.dump(settings, open(sys.argv[1], 'w'), indent=1)" "$TUTORIAL_SETTINGS"  # no wandb in the GPU image: W&B off

case "$stage" in
world) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ;;
generation)
  (cd benchmarks && python3 bench_sampling.py --world "$world" --out "$out/generation.json" \
    --paths greedy_answers chat --batches 32 64 --new-tokens 256 --timeout 120 "${@:2}")
  ;;
rl-step)
  python3 benchmarks/bench_rl_step.py --steps 5 --out "$out/rl-step-uncapped.json"
  BENCH_MEMORY_CAP_GIB="$cap" PYTHONPATH="$PWD/benchmarks/cap:$PYTHONPATH" \
    python3 benchmarks/bench_rl_step.py --steps 5 --out "$out/rl-step-capped.json"
  ;;
notebooks)
  status=0
  python3 benchmarks/run_capped.py --cap-gib "$cap" --out "$out" --notebooks "${@:2}" || status=$?
  cp "$TUTORIAL_OUTPUTS/$TUTORIAL_PROFILE/metrics.json" "$out/capped-metrics-$2.json" 2>/dev/null || true
  exit $status
  ;;
lanes)
  pids=()
  for lane in "${@:2}"; do
    name="lane-${lane// /-}"
    TUTORIAL_OUTPUTS="$TUTORIAL_OUTPUTS/$name" TUTORIAL_SETTINGS="/tmp/shapes-settings-$name.json" \
      bash "$0" notebooks $lane >"$out/$name.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  exit $status
  ;;
bench) python3 benchmarks/bench_training.py --world "$world" --out "$out/$2.json" --timeout 240 "${@:3}" ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac
