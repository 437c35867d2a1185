#!/bin/bash
# Take docs/jupyterlab.png: JupyterLab's file browser on notebooks/, rendered by headless Chromium.
# Needs Chromium (Debian: apt-get install -y chromium) and the project's environment (make setup).
# Usage: deploy/screenshot.sh [OUT.png]   Settings: PYTHON (default .venv/bin/python), CHROMIUM (default chromium)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=$(realpath -m "${1:-docs/jupyterlab.png}")
PYTHON=${PYTHON:-.venv/bin/python}
CHROMIUM=${CHROMIUM:-chromium}
TMP=$(mktemp -d)
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')

# A fresh Jupyter configuration, so no remembered layout shows, and without the news pop-up.
mkdir -p "$TMP/config/labconfig"
echo '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}' \
	>"$TMP/config/labconfig/page_config.json"
JUPYTER_CONFIG_DIR=$TMP/config JUPYTER_RUNTIME_DIR=$TMP/runtime TUTORIAL_PROFILE=smoke \
	"$PYTHON" -m jupyterlab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port="$PORT" \
	--ServerApp.port_retries=0 --IdentityProvider.token="$TOKEN" --ServerApp.root_dir="$PWD" \
	--LabApp.workspaces_dir="$TMP/workspaces" --ServerApp.allow_root=True >"$TMP/lab.log" 2>&1 &
LAB=$!
trap 'kill "$LAB" 2>/dev/null; wait "$LAB" 2>/dev/null; rm -rf "$TMP"' EXIT

for _ in $(seq 60); do
	curl -sf -H "Authorization: token $TOKEN" "http://127.0.0.1:$PORT/api/status" >/dev/null && break
	sleep 0.5
done
curl -sf -H "Authorization: token $TOKEN" "http://127.0.0.1:$PORT/api/status" >/dev/null || {
	cat "$TMP/lab.log"
	exit 1
}

# JupyterLab renders in the browser: the virtual-time budget lets its scripts finish before the capture.
mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
	--disable-component-update --disable-sync --user-data-dir="$TMP/chromium" --window-size=1400,900 \
	--virtual-time-budget=15000 --hide-scrollbars --screenshot="$OUT" \
	"http://127.0.0.1:$PORT/lab/tree/notebooks?token=$TOKEN"
echo "wrote $OUT"
