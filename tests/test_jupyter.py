"""JupyterLab for real: serve the repository, list the notebook series, run a notebook through a kernel.

What a Brev user does by hand, done over Jupyter Server's REST and websocket APIs: the server starts, shows
`notebooks/`, starts a kernel, and `notebooks/01_theory.ipynb` runs in it cell by cell without an error.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websocket

from helpers.settings import PROJECT_ROOT

THEORY_NOTEBOOK = "notebooks/01_theory.ipynb"
START_TIMEOUT_S = 30
CELL_TIMEOUT_S = 30
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    """A TCP port that was free a moment ago (the server is told not to retry others)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab server: its process, port and token."""

    process: subprocess.Popen
    port: int
    token: str

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the REST API; return the decoded JSON answer (None when empty)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None


def start_lab(root: Path, log: Path) -> Lab:
    """Start JupyterLab on 127.0.0.1 with a random port and token, serving `root`; return once it answers.

    Raises:
        RuntimeError: the server exited or did not answer within START_TIMEOUT_S (its log is in the message).
    """
    port, token = free_port(), secrets.token_hex(16)
    runtime = log.parent / "jupyter-runtime"
    env = os.environ | {
        "TUTORIAL_PROFILE": "smoke",
        # Keep the user's Jupyter configuration and state out of the test.
        "JUPYTER_CONFIG_DIR": str(runtime / "config"),
        "JUPYTER_RUNTIME_DIR": str(runtime / "runtime"),
    }
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={runtime / 'workspaces'}",
        "--ServerApp.allow_root=True",  # containers and CI often run as root; it changes nothing otherwise
    ]  # fmt: skip
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    lab = Lab(process, port, token)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            lab.api("GET", "/api/status")
            return lab
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    stop_lab(lab)
    raise RuntimeError(f"JupyterLab did not answer within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


def stop_lab(lab: Lab) -> None:
    """Stop the server (it shuts its kernels down first); kill it if it does not stop."""
    lab.process.terminate()
    try:
        lab.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        lab.process.kill()
        lab.process.wait()


def execute(ws: websocket.WebSocket, session: str, code: str) -> dict[str, Any]:
    """Send one execute_request over the kernel's channels; return the content of its execute_reply."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": session, "username": "test"}
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
    }
    request = {"header": header | {"version": "5.3"}, "parent_header": {}, "metadata": {}, "content": content}
    ws.send(json.dumps(request | {"channel": "shell", "buffers": []}))
    while True:
        message = json.loads(ws.recv())
        if message["msg_type"] == "execute_reply" and message["parent_header"].get("msg_id") == msg_id:
            return message["content"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = start_lab(PROJECT_ROOT, tmp_path_factory.mktemp("lab") / "jupyterlab.log")
    yield lab
    stop_lab(lab)


def test_lab_lists_the_notebook_series(lab):
    on_disk = {path.name for path in (PROJECT_ROOT / "notebooks").glob("0*.ipynb")}
    assert on_disk, "no notebooks/0*.ipynb on disk"
    listing = lab.api("GET", "/api/contents/notebooks")
    served = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
    assert on_disk <= served, f"JupyterLab does not list {sorted(on_disk - served)}"


def test_theory_notebook_runs_in_a_lab_kernel(lab):
    if not (PROJECT_ROOT / THEORY_NOTEBOOK).is_file():
        pytest.skip(f"{THEORY_NOTEBOOK} does not exist yet")
    notebook = lab.api("GET", f"/api/contents/{THEORY_NOTEBOOK}")["content"]
    # NBVAL_SKIP cells are skipped as under `pytest --nbval-lax`, so both runs execute the same cells.
    cells = [
        "".join(cell["source"])
        for cell in notebook["cells"]
        if cell["cell_type"] == "code" and "# NBVAL_SKIP" not in "".join(cell["source"])
    ]
    assert cells, f"{THEORY_NOTEBOOK} has no code cells"
    # The kernel starts in notebooks/, as when the notebook is opened in the lab.
    declared = notebook["metadata"]["kernelspec"]["name"]  # registered by `make setup`: the lab must know it
    kernel = lab.api("POST", "/api/kernels", {"name": declared, "path": "notebooks"})
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel['id']}/channels?token={lab.token}",
        timeout=CELL_TIMEOUT_S,
    )
    try:
        session = uuid.uuid4().hex
        for index, code in enumerate(cells):
            reply = execute(ws, session, code)
            if reply["status"] != "ok":
                traceback = ANSI.sub("", "\n".join(reply.get("traceback", [])))
                error = f"{reply.get('ename')}: {reply.get('evalue')}"
                pytest.fail(f"code cell {index} failed with {error}\n{code}\n{traceback}")
    finally:
        ws.close()
        lab.api("DELETE", f"/api/kernels/{kernel['id']}")


def test_notebooks_declare_the_kernel_that_setup_registers():
    import json
    import re

    declared = {
        json.loads(p.read_text())["metadata"]["kernelspec"]["name"]
        for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb")
    }
    brev = re.search(r"^KERNEL_NAME=(\S+)$", (PROJECT_ROOT / "deploy" / "brev-setup.sh").read_text(), re.M).group(1)
    make = re.search(r"ipykernel install --sys-prefix --name (\S+)", (PROJECT_ROOT / "Makefile").read_text()).group(1)
    assert declared == {brev} == {make}
