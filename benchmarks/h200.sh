#!/usr/bin/env bash
# What ran on the lent H200 (through the device tool), so the results can be repeated on any CUDA machine.
#
#   bash benchmarks/h200.sh quick       # environment check + short runs of every path, settings sweep (~8 min)
#   bash benchmarks/h200.sh bench NAME --paths ...   # the benchmark, every path in its own process, to NAME.json
#   bash benchmarks/h200.sh notebooks   # the main job (every notebook) on the 8B shapes, capped, W&B offline
#   bash benchmarks/h200.sh notebooks 05 06   # only these notebooks (split a run over calls of 10 minutes)
#   bash benchmarks/h200.sh bench NAME --paths project_dpo unsloth_trl_defaults_dpo --repeats 3   # the DPO ratio
#   bash benchmarks/h200.sh bench NAME ... --resume   # continue NAME.json in a later call (same machine and world)
#
# Settings: OUT (results folder), WORLD (the shapes world, default /tmp/shapes-world), and for `notebooks`
# TUTORIAL_PROFILE (default quick), TUTORIAL_OUTPUTS (default /tmp/tutorial-outputs), BENCH_ROWS (rows of each
# dataset, 1000), BENCH_MAX_STEPS (steps a stage, 10), BENCH_NEW_TOKENS (tokens an answer, the profile's),
# MAIN_JOB_TIMEOUT (seconds, 480), SUMMARY (the summary's name, h200-main-job).
#
# The H200 image lacks trl, datasets, bitsandbytes and unsloth: `bash ../shared/gpu/make-bundle.sh .gpu` builds
# them into .gpu/gpu-site.tgz; the notebook run also needs the wheels in .whl/ (nbclient, ipykernel, wandb, ...),
# and so does `bench` for IPython (helpers' training table subclasses transformers' notebook callback).
# Results go to $OUT (the device tool brings that folder back), else to benchmarks/results/.
set -euo pipefail
stage="${1:?quick, bench or notebooks}"
out="${OUT:-benchmarks/results}"
world="${WORLD:-/tmp/shapes-world}"
mkdir -p "$out"
if [ -f .gpu/gpu-site.tgz ]; then
  mkdir -p /tmp/site && tar xzf .gpu/gpu-site.tgz -C /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export JUPYTER_PATH=/tmp/site/share/jupyter  # nbconvert's templates (installed with --target, not in sys.prefix)
  fi
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv

if [ ! -f "$world/model-bnb-4bit/config.json" ]; then
  start=$SECONDS
  reward=""
  [ "$stage" = notebooks ] && reward="--reward-model"  # keep the bf16 copy: an 8B-shaped reward-model stand-in
  python3 benchmarks/shapes.py --out "$world" --model $reward --sft-rows 1300 --preference-rows 1300 >/dev/null
  echo "world built in $((SECONDS - start)) s: $(cat "$world/stats.json" | tr -d ' \n' | cut -c1-1500)"
fi

case "$stage" in
quick)
  sweep=(
    --set 'check={"kind": "check_flash_varlen"}'
    --set 'sft_b8={"kind": "project_sft", "mode": "budget", "warmup": 3, "budget_s": 15}'
    --set 'plain_8x2048={"kind": "plain_loop", "warmup": 2, "steps": 5}'
    --set 'dpo_b16={"kind": "project_dpo", "mode": "budget", "warmup": 3, "budget_s": 20, "rows": 400, "dpo": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1}}'
    --set 'defaults_dpo={"kind": "defaults_dpo", "mode": "budget", "warmup": 4, "budget_s": 20, "rows": 400}'
    --set 'sft_b8_no_flash_varlen={"kind": "project_sft", "mode": "budget", "warmup": 3, "budget_s": 15, "flash_varlen": false}'
    --set 'dpo_b8={"kind": "project_dpo", "mode": "budget", "warmup": 3, "budget_s": 20, "rows": 400, "dpo": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}}'
    --set 'dpo_b32={"kind": "project_dpo", "mode": "budget", "warmup": 2, "budget_s": 20, "rows": 400, "dpo": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1}}'
    --set 'hf_sft={"kind": "project_sft", "backend": "hf", "mode": "budget", "warmup": 1, "budget_s": 12}'
    --set 'dpo_2048_b2={"kind": "project_dpo", "mode": "budget", "warmup": 3, "budget_s": 10, "rows": 1500, "dpo": {"max_length": 2048, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}}'
  )
  python3 benchmarks/bench_training.py --world "$world" --out "$out/quick.json" --timeout 150 "${sweep[@]}" \
    --paths check sft_b8 plain_8x2048 dpo_b16 defaults_dpo sft_b8_no_flash_varlen hf_sft dpo_b8 dpo_2048_b2 dpo_b32 || true
  ;;
bench)
  name="${2:?bench NAME [bench_training.py arguments]}"
  python3 benchmarks/bench_training.py --world "$world" --out "$out/$name.json" --timeout 240 "${@:3}"
  ;;
notebooks)
  # A GPU profile's code path (Unsloth, 4-bit, its batch settings) on the 8B shapes, capped: BENCH_ROWS rows of each
  # dataset, BENCH_MAX_STEPS optimizer steps a stage (a TUTORIAL_SETTINGS file written by shapes.py).
  profile="${TUTORIAL_PROFILE:-quick}"
  settings=/tmp/shapes-settings.json
  python3 benchmarks/shapes.py --out "$world" --settings "$settings" \
    --max-rows "${BENCH_ROWS:-1000}" --max-steps "${BENCH_MAX_STEPS:-10}" ${BENCH_NEW_TOKENS:+--max-new-tokens "$BENCH_NEW_TOKENS"}
  python3 -c "import wandb" 2>/dev/null || python3 -c "
import json, sys
settings = json.load(open(sys.argv[1])) | {'report_to_wandb': False}
json.dump(settings, open(sys.argv[1], 'w'), indent=1)
print('wandb is not installed here: W&B logging off')" "$settings"
  export TUTORIAL_PROFILE="$profile" TUTORIAL_BACKEND=unsloth TUTORIAL_SETTINGS="$settings"
  export TUTORIAL_OUTPUTS="${TUTORIAL_OUTPUTS:-/tmp/tutorial-outputs}"
  run="$TUTORIAL_OUTPUTS/$profile" summary="${SUMMARY:-h200-main-job}"
  start=$SECONDS
  status=0
  timeout "${MAIN_JOB_TIMEOUT:-480}" python3 -m helpers.run "${@:2}" || status=$?
  echo "main job: exit $status in $((SECONDS - start)) s"
  python3 benchmarks/summarize_main_job.py "$run" --out "$out/$summary.json" || true
  cp "$run/report.md" "$out/$summary-report.md" 2>/dev/null || true
  cp "$run"/*.png "$out/" 2>/dev/null || true
  exit $status
  ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac
