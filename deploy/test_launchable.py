"""launchable.yaml validates and renders; the Brev setup script plans, installs once, copes without pip.

These tests import neither torch nor `helpers` (nor does `deploy.launchable`: one test checks it).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy.launchable import (
    DEFAULT_PATH,
    PROJECT_ROOT,
    LaunchableError,
    command,
    format_command,
    load,
    payload,
    read_script,
)

# The document that shows the generated dry-run command.
DOCUMENT_WITH_COMMAND = PROJECT_ROOT / "README.md"
SETUP_SCRIPT = PROJECT_ROOT / "deploy/brev-setup.sh"


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_committed_file_validates_and_renders():
    launchable = load()
    argv = command(launchable)
    assert argv[:4] == ["brev", "launchable", "create", "align-llama"]
    assert flag(argv, "--mode") == "vm"
    assert flag(argv, "--instance-type") == "a2-highgpu-1g:nvidia-tesla-a100:1"
    assert flag(argv, "--lifecycle-script-file") == "deploy/brev-setup.sh"
    assert flag(argv, "--secure-link").startswith("name=jupyter,port=8888")
    assert flag(argv, "--file-url").startswith("https://github.com/")
    assert "--jupyter" in argv and argv[-1] == "--dry-run"
    # The printed form is one shell command that quotes back to the same arguments.
    assert shlex.split(format_command(argv).replace("\\\n", " ")) == argv


def test_payload_has_the_request_fields():
    launchable = load()
    body = json.loads(json.dumps(payload(launchable)))
    assert list(body) == [
        "name",
        "description",
        "viewAccess",
        "createWorkspaceRequest",
        "buildRequest",
        "file",
    ]
    assert body["viewAccess"] == "public"
    assert body["createWorkspaceRequest"] == {
        "instanceType": "a2-highgpu-1g:nvidia-tesla-a100:1",
        "storage": str(launchable.storage_gib),
        "firewallRules": [],
    }
    vm_build = body["buildRequest"]["vmBuild"]
    assert vm_build["forceJupyterInstall"] is True
    assert vm_build["lifeCycleScriptAttr"] == {"name": "brev-setup.sh", "script": SETUP_SCRIPT.read_text()}
    assert body["buildRequest"]["ports"] == [
        {"name": "jupyter", "port": "8888", "labels": {"cta-enabled": "true", "cta-value": "Open JupyterLab"}}
    ]
    parameters = body["buildRequest"]["parameters"]
    assert [p["name"] for p in parameters] == ["HF_TOKEN", "WANDB_API_KEY"]
    assert all(set(p) == {"name", "description", "required"} and p["description"] for p in parameters)
    assert body["file"] == {"url": launchable.file_url, "path": "./"}


def write_variant(tmp_path: Path, change, script: str | None = None) -> Path:
    """Write the committed launchable file with `change(data)` applied, and optionally its own script."""
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["lifecycle_script_file"] = str(SETUP_SCRIPT)
    if script is not None:
        (tmp_path / "setup.sh").write_text(script)
        data["lifecycle_script_file"] = "setup.sh"
    change(data)
    path = tmp_path / "launchable.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


INVALID = {
    "unknown key": (
        lambda d: d.update(instance="a100"),
        None,
        r"unknown key 'instance' in launchable\.yaml; allowed keys: name, description, view_access, ",
    ),
    "unknown nested key": (
        lambda d: d["secure_links"][0].update(portt=1),
        None,
        r"unknown key 'portt' in secure_links\[0\]; allowed keys: name, port, cta, cta_label",
    ),
    "missing field": (lambda d: d.pop("instance_type"), None, r"missing field 'instance_type' in launchable"),
    "wrong type": (
        lambda d: d.update(storage_gib="256"),
        None,
        r"'storage_gib' in launchable\.yaml must be int",
    ),
    "bad shebang": (lambda d: None, "#!/bin/sh\necho hi\n", r"setup\.sh must start with #!/bin/bash"),
    "script over 16 KiB": (
        lambda d: None,
        "#!/bin/bash\n" + "#" * 16384 + "\n",
        r"setup\.sh is 16397 bytes; Brev's limit is 16384 \(16 KiB\)",
    ),
    "bad view access": (
        lambda d: d.update(view_access="private"),
        None,
        r"view_access 'private' is not one of public, organization, published",
    ),
    "parameter with a value": (
        lambda d: d["parameters"][0].update(value="hf_not_a_real_token"),
        None,
        r"parameter 'HF_TOKEN' carries a value",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_file_raises_a_clear_error(tmp_path, case):
    change, script, message = INVALID[case]
    with pytest.raises(LaunchableError, match=message) as caught:
        load(write_variant(tmp_path, change, script))
    assert "\n" not in str(caught.value)


def test_not_yaml_raises(tmp_path):
    path = tmp_path / "launchable.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(LaunchableError, match=r"launchable\.yaml is not valid YAML at line \d"):
        load(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.launchable", *args], capture_output=True, text=True, cwd=PROJECT_ROOT
    )


def test_cli_prints_command_and_payload():
    launchable = load()
    assert run_cli().stdout == format_command(command(launchable)) + "\n"
    assert json.loads(run_cli("--json").stdout) == payload(launchable)


def test_module_imports_neither_torch_nor_helpers():
    code = "import sys, deploy.launchable; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'helpers'}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.stdout == "[]\n", result.stderr


def test_cli_bad_file_exits_2_with_one_line(tmp_path):
    result = run_cli(str(write_variant(tmp_path, lambda d: d.update(view_access="private"))))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: view_access 'private'") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_documented_command_matches_the_generator():
    text = DOCUMENT_WITH_COMMAND.read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(brev launchable create.*?)\n```", text, re.S)
    assert blocks, f"{DOCUMENT_WITH_COMMAND.name} shows no `brev launchable create` block"
    generated = format_command(command(load()))
    assert blocks == [generated] * len(blocks), f"paste the output of python -m deploy.launchable:\n{generated}"


# The setup script, run against stand-ins for python3 and uv that record their calls instead of installing.
# The stand-ins come first on PATH; the system folders provide bash's tools (sha256sum, tee, grep).
SYSTEM_PATH = "/usr/bin:/bin"
FAKE_PYTHON = """#!/bin/bash
if [[ $1 == -c && $2 != *torch* ]]; then exec {real} "$@"; fi
printf '%s\\n' "$*" >> "$FAKE_CALLS"
if [[ $1 == -c ]]; then echo "2.13.0 True"; fi
if [[ "$*" == "-m pip --version" && -n ${{FAKE_NO_PIP:-}} ]]; then exit 1; fi
exit 0
"""
FAKE_UV = """#!/bin/bash
printf 'uv %s\\n' "$*" >> "$FAKE_CALLS"
"""


@dataclass
class Machine:
    """A fake machine: a home folder and python3 (optionally uv) stand-ins that log calls to `calls`."""

    home: Path
    bin: Path
    calls: Path
    env: dict[str, str]

    def run_setup(self, **extra: str) -> tuple[str, list[str]]:
        """Run the setup script with `extra` environment; return its output and all stand-in calls so far."""
        result = subprocess.run(
            ["bash", str(SETUP_SCRIPT)], env=self.env | extra, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout, self.calls.read_text().splitlines()


@pytest.fixture
def machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON.format(real=shlex.quote(sys.executable)))
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    env = {
        "PATH": f"{bin_dir}:{SYSTEM_PATH}",
        "HOME": str(tmp_path / "home"),
        "ALIGN_LLAMA_DIR": str(PROJECT_ROOT),
        "FAKE_CALLS": str(calls),
    }
    return Machine(home=tmp_path / "home", bin=bin_dir, calls=calls, env=env)


def installs(calls: list[str]) -> list[str]:
    return [call for call in calls if " install" in call or "ensurepip" in call]


def test_setup_script_is_within_brev_limits():
    assert read_script(SETUP_SCRIPT).startswith("#!/bin/bash\n")


def test_setup_dry_run_prints_the_plan_and_installs_nothing(machine):
    output, calls = machine.run_setup(SETUP_DRY_RUN="1")
    assert installs(calls) == []
    assert re.search(r"\+ \S+ -m pip install -e \S+\\\[dev\\\] unsloth==2026\.10\.9 unsloth_zoo==", output)
    assert "-m ipykernel install --user --name align-llama" in output
    assert not (machine.home / ".cache/align-llama/setup.stamp").exists()
    assert (machine.home / "align-llama-setup.log").read_text() == output


def test_setup_installs_once_then_is_a_no_op(machine):
    _, calls = machine.run_setup()
    assert [call.split()[:4] for call in installs(calls)] == [
        ["-m", "pip", "install", "-e"],
        ["-m", "pip", "install", "--no-deps"],
        ["-m", "ipykernel", "install", "--user"],
    ]
    assert f"{PROJECT_ROOT}[dev] unsloth==2026.10.9 unsloth_zoo==2026.10.9" in installs(calls)[0]
    assert (machine.home / ".cache/align-llama/setup.stamp").is_file()

    start = time.monotonic()
    output, calls_after = machine.run_setup()
    assert calls_after == calls
    assert "nothing to do" in output
    assert time.monotonic() - start < 10


def test_setup_without_pip_uses_uv(machine):
    (machine.bin / "uv").write_text(FAKE_UV)
    (machine.bin / "uv").chmod(0o755)
    _, calls = machine.run_setup(FAKE_NO_PIP="1")
    assert [call.split()[:4] for call in installs(calls)] == [
        ["uv", "pip", "install", "--python"],
        ["uv", "pip", "install", "--python"],
        ["-m", "ipykernel", "install", "--user"],
    ]


@pytest.mark.skipif(shutil.which("uv", path=SYSTEM_PATH) is not None, reason="uv is on the system PATH")
def test_setup_without_pip_or_uv_bootstraps_pip(machine):
    _, calls = machine.run_setup(FAKE_NO_PIP="1")
    assert [call.split()[:3] for call in installs(calls)] == [
        ["-m", "ensurepip", "--upgrade"],
        ["-m", "pip", "install"],
        ["-m", "pip", "install"],
        ["-m", "ipykernel", "install"],
    ]


def test_setup_script_asks_for_the_python_pyproject_requires():
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    major, minor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject).groups()
    script = SETUP_SCRIPT.read_text()
    assert f"sys.exit(sys.version_info < ({major}, {minor}))" in script
    assert script.count(f"Python {major}.{minor}") == 2 and "3.10" not in script
