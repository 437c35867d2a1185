"""The Brev.dev launchable: validate `launchable.yaml` and render it for Brev's CLI.

Brev reads no configuration file of its own, so `launchable.yaml` is the declarative source. This module
checks it against the limits Brev enforces (and one of ours: no secret values in the file) and renders it as

- the `brev launchable create ... --dry-run` command line (run it from the folder that holds the YAML file:
  the lifecycle script path is relative to it), or
- the `CreateEnvironmentLaunchableRequest` JSON payload that command sends (`--json`).

Usage, from the repository root: `python -m deploy.launchable [--json] [PATH]`. An invalid file prints one line
and exits with 2. Deployment-only, so it imports neither torch nor `helpers`: PyYAML is all it needs.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = PROJECT_ROOT / "launchable.yaml"
VIEW_ACCESS = ("public", "organization", "published")
# The lifecycle script is the reason for VM mode; compose mode takes no lifecycle script.
MODES = ("vm",)
ALLOWED_IPS = ("all", "user-ip")
SHEBANG = "#!/bin/bash"
MAX_SCRIPT_BYTES = 16 * 1024
# Brev's rule for secure link (tunnel) names: lowercase letters, digits and inner hyphens, at most 63.
LINK_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
PARAMETER_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
SCALAR_TYPES = {"str": str, "int": int, "bool": bool}
LIST_FIELDS = ("secure_links", "firewall_rules", "parameters")


class LaunchableError(ValueError):
    """A launchable file that Brev would reject or that breaks this project's rules; a one-line message."""


@dataclass(frozen=True)
class SecureLink:
    """A port behind Brev's authenticated tunnel; `cta` makes it a button on the launchable's page."""

    name: str
    port: int
    cta: bool = False
    cta_label: str = ""


@dataclass(frozen=True)
class FirewallRule:
    """A port (`8000`) or range (`8000-8100`) opened to `all` or to the deploying user's IP (`user-ip`)."""

    ports: str
    allowed_ips: str = "all"


@dataclass(frozen=True)
class Parameter:
    """An environment variable the user fills in when deploying; the file holds its name, never its value."""

    name: str
    description: str
    required: bool = False


@dataclass(frozen=True)
class Launchable:
    """`launchable.yaml`, validated; `lifecycle_script` is the text of `lifecycle_script_file`."""

    name: str
    description: str
    view_access: str
    mode: str
    instance_type: str
    storage_gib: int
    file_url: str
    jupyter: bool
    lifecycle_script_file: str
    lifecycle_script: str
    secure_links: tuple[SecureLink, ...] = ()
    firewall_rules: tuple[FirewallRule, ...] = ()
    parameters: tuple[Parameter, ...] = ()


def _checked(cls: type, data: Any, where: str, not_in_file: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check one YAML mapping against the fields of `cls`: no unknown key, no missing field, scalar types.

    Args:
        cls: the dataclass the mapping describes.
        data: the parsed YAML value.
        where: where the mapping sits, for messages (`launchable.yaml`, `parameters[1]`).
        not_in_file: fields of `cls` that the loader fills in, not the file.

    Returns:
        The mapping, unchanged.

    Raises:
        LaunchableError: naming the offending key and, for an unknown key, the allowed ones.
    """
    if not isinstance(data, dict):
        raise LaunchableError(f"{where} must be a mapping, not {type(data).__name__}")
    file_fields = [f for f in fields(cls) if f.name not in not_in_file]
    allowed = [f.name for f in file_fields]
    for key in data:
        if key not in allowed:
            raise LaunchableError(f"unknown key {key!r} in {where}; allowed keys: {', '.join(allowed)}")
    for f in file_fields:
        if f.name not in data:
            if f.default is MISSING:
                raise LaunchableError(f"missing field {f.name!r} in {where}")
            continue
        expected = SCALAR_TYPES.get(str(f.type))
        value = data[f.name]
        # bool is a subclass of int: `storage_gib: true` must not pass as a size.
        if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            raise LaunchableError(f"{f.name!r} in {where} must be {f.type}, not {value!r}")
    return data


def _items(data: dict[str, Any], key: str, where: str) -> list[Any]:
    """Return the list under `key` (empty when absent); raise LaunchableError if it is not a list."""
    items = data.get(key) or []
    if not isinstance(items, list):
        raise LaunchableError(f"{key!r} in {where} must be a list, not {type(items).__name__}")
    return items


def _secure_link(data: Any, where: str) -> SecureLink:
    link = SecureLink(**_checked(SecureLink, data, where))
    if not LINK_NAME.fullmatch(link.name):
        raise LaunchableError(f"{where}: name {link.name!r} must be lowercase letters, digits and hyphens")
    if not 1 <= link.port <= 65535:
        raise LaunchableError(f"{where}: port {link.port} is outside 1-65535")
    if link.cta_label and not link.cta:
        raise LaunchableError(f"{where}: cta_label needs cta: true")
    return link


def _firewall_rule(data: Any, where: str) -> FirewallRule:
    rule = FirewallRule(**_checked(FirewallRule, data, where))
    if rule.allowed_ips not in ALLOWED_IPS:
        raise LaunchableError(f"{where}: allowed_ips {rule.allowed_ips!r} is not one of {', '.join(ALLOWED_IPS)}")
    if not re.fullmatch(r"\d+(-\d+)?", rule.ports):
        raise LaunchableError(f"{where}: ports {rule.ports!r} must be a port or a range like 8000-8100")
    return rule


def _parameter(data: Any, where: str) -> Parameter:
    # Checked before the keys for a clearer message than "unknown key": a value here is a secret in git.
    if isinstance(data, dict) and ("value" in data or "default" in data):
        raise LaunchableError(
            f"parameter {data.get('name', where)!r} carries a value; launchable.yaml holds names and "
            "descriptions only (users enter values in Brev's console)"
        )
    parameter = Parameter(**_checked(Parameter, data, where))
    if not PARAMETER_NAME.fullmatch(parameter.name):
        raise LaunchableError(f"{where}: {parameter.name!r} is not an environment variable name")
    return parameter


def read_script(path: Path) -> str:
    """Read a lifecycle script and check Brev's limits on it.

    Args:
        path: the script file.

    Returns:
        The script text.

    Raises:
        LaunchableError: the file is missing, does not start with `#!/bin/bash`, or exceeds 16 KiB.
    """
    if not path.is_file():
        raise LaunchableError(f"lifecycle script {path} does not exist")
    script = path.read_bytes()
    if len(script) > MAX_SCRIPT_BYTES:
        raise LaunchableError(
            f"lifecycle script {path} is {len(script)} bytes; Brev's limit is {MAX_SCRIPT_BYTES} (16 KiB)"
        )
    if not script.startswith(SHEBANG.encode()):
        raise LaunchableError(f"lifecycle script {path} must start with {SHEBANG}")
    return script.decode()


def load(path: Path = DEFAULT_PATH) -> Launchable:
    """Load and validate a launchable file.

    Args:
        path: the YAML file; `lifecycle_script_file` is resolved relative to its folder.

    Returns:
        The validated launchable, with the lifecycle script's text.

    Raises:
        LaunchableError: the file is missing, not YAML, or breaks one of the rules above.
    """
    path = Path(path)
    where = path.name
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise LaunchableError(f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise LaunchableError(f"{where} is not valid YAML{line}: {getattr(err, 'problem', err)}") from err
    data = _checked(Launchable, data, where, not_in_file=("lifecycle_script",))
    if data["view_access"] not in VIEW_ACCESS:
        raise LaunchableError(f"view_access {data['view_access']!r} is not one of {', '.join(VIEW_ACCESS)}")
    if data["mode"] not in MODES:
        raise LaunchableError(f"mode {data['mode']!r} is not supported; use one of {', '.join(MODES)}")
    if data["storage_gib"] <= 0:
        raise LaunchableError(f"storage_gib must be a positive number of GiB, not {data['storage_gib']}")
    if not data["file_url"].startswith("https://") or data["file_url"].endswith("/"):
        raise LaunchableError(f"file_url {data['file_url']!r} must be https://, without a trailing slash")
    links, rules, parameters = (_items(data, key, where) for key in LIST_FIELDS)
    return Launchable(
        **{key: value for key, value in data.items() if key not in LIST_FIELDS},
        lifecycle_script=read_script(path.parent / data["lifecycle_script_file"]),
        secure_links=tuple(_secure_link(item, f"secure_links[{i}]") for i, item in enumerate(links)),
        firewall_rules=tuple(_firewall_rule(item, f"firewall_rules[{i}]") for i, item in enumerate(rules)),
        parameters=tuple(_parameter(item, f"parameters[{i}]") for i, item in enumerate(parameters)),
    )


def command(launchable: Launchable) -> list[str]:
    """Return the `brev launchable create ... --dry-run` argument list for `launchable`.

    Parameters have no CLI flag: Brev's console asks for them when the launchable is deployed.
    """
    argv = [
        "brev", "launchable", "create", launchable.name,
        "--description", launchable.description,
        "--view-access", launchable.view_access,
        "--mode", launchable.mode,
        "--instance-type", launchable.instance_type,
        "--storage", str(launchable.storage_gib),
        "--file-url", launchable.file_url,
        "--jupyter" if launchable.jupyter else "--jupyter=false",
        "--lifecycle-script-file", launchable.lifecycle_script_file,
    ]  # fmt: skip
    for link in launchable.secure_links:
        value = f"name={link.name},port={link.port}"
        if link.cta:
            value += ",cta=true" + (f",cta-label={link.cta_label}" if link.cta_label else "")
        argv += ["--secure-link", value]
    for rule in launchable.firewall_rules:
        argv += ["--firewall-rule", f"ports={rule.ports},allowed-ips={rule.allowed_ips}"]
    return [*argv, "--dry-run"]


def format_command(argv: list[str]) -> str:
    """Quote `argv` for a POSIX shell, one flag (with its value) per continued line."""
    lines = [shlex.join(argv[:4])]
    for arg in argv[4:]:
        if arg.startswith("--"):
            lines.append(shlex.quote(arg))
        else:
            lines[-1] += " " + shlex.quote(arg)
    return " \\\n  ".join(lines)


def _port(link: SecureLink) -> dict[str, Any]:
    port: dict[str, Any] = {"name": link.name, "port": str(link.port)}
    if link.cta:
        port["labels"] = {"cta-enabled": "true", "cta-value": link.cta_label or link.name}
    return port


def payload(launchable: Launchable) -> dict[str, Any]:
    """Return the `CreateEnvironmentLaunchableRequest` body for `launchable`.

    Shaped like Brev's CLI request (ports and storage are strings there); `workspaceGroupId` is left out: the
    CLI looks it up for the user's organisation.
    """
    return {
        "name": launchable.name,
        "description": launchable.description,
        "viewAccess": launchable.view_access,
        "createWorkspaceRequest": {
            "instanceType": launchable.instance_type,
            "storage": str(launchable.storage_gib),
            "firewallRules": [
                {"port": rule.ports, "allowedIPs": rule.allowed_ips} for rule in launchable.firewall_rules
            ],
        },
        "buildRequest": {
            "vmBuild": {
                "forceJupyterInstall": launchable.jupyter,
                "lifeCycleScriptAttr": {
                    "name": Path(launchable.lifecycle_script_file).name,
                    "script": launchable.lifecycle_script,
                },
            },
            "ports": [_port(link) for link in launchable.secure_links],
            "parameters": [
                {"name": p.name, "description": p.description, "required": p.required} for p in launchable.parameters
            ],
        },
        "file": {"url": launchable.file_url, "path": "./"},
    }


def main(argv: list[str] | None = None) -> int:
    """Print the dry-run command line (or, with `--json`, the payload); return 2 on an invalid file."""
    parser = argparse.ArgumentParser(prog="python -m deploy.launchable", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help="launchable file")
    parser.add_argument("--json", action="store_true", help="print the request payload instead")
    args = parser.parse_args(argv)
    try:
        launchable = load(args.path)
    except LaunchableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(payload(launchable), indent=2) if args.json else format_command(command(launchable)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
