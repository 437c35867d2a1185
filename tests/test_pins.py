"""environment.yml is the one source of truth for versions: every other pin in the repository must agree."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from helpers.settings import PROJECT_ROOT

PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!*-]+)")
MAKEFILE_PIN_VARIABLES = ("UNSLOTH_CPU", "UNSLOTH_CPU_NEEDS")
TEST_ONLY_PACKAGES = ("llama-models", "tiktoken")  # Meta's tokenizer for tests/test_llama3_tokenizer.py


def normalize(name: str) -> str:
    """PEP 503 name normalisation: `Nest_Asyncio` and `nest-asyncio` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_pins() -> dict[str, str]:
    """Return {normalised name: version} from environment.yml's pip section and its `no-deps:` comment line (packages
    installed without their dependencies, which a pip section cannot say); fail on an unpinned entry."""
    text = (PROJECT_ROOT / "environment.yml").read_text()
    env = yaml.safe_load(text)
    pip_sections = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    pins = {}
    for entry in pip_sections[0]:
        if entry.startswith("-e "):
            continue
        match = PIN.fullmatch(entry)
        assert match, f"environment.yml: {entry!r} is not an exact name==version pin"
        pins[normalize(match[1])] = match[2]
    no_deps = [line for line in text.splitlines() if line.lstrip("# ").startswith("no-deps: pip install --no-deps ")]
    assert len(no_deps) == 1, "environment.yml needs one `#   no-deps: pip install --no-deps ...` line"
    pins |= {normalize(name): version for name, version in PIN.findall(no_deps[0])}
    return pins


def pyproject_pins() -> list[tuple[str, str]]:
    """Pins in pyproject.toml's dependencies and optional dependencies; every one must be exact."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = project["dependencies"] + [requirement for extra in extras for requirement in extra]
    pins = []
    for requirement in requirements:
        if requirement.startswith(f"{project['name']}["):
            continue
        match = PIN.fullmatch(requirement.replace(" ", ""))
        assert match, f"pyproject.toml: {requirement!r} is not an exact name==version pin"
        pins.append(match.groups())
    return pins


def makefile_pins() -> list[tuple[str, str]]:
    """Pins anywhere in the Makefile: its UNSLOTH_CPU and UNSLOTH_CPU_NEEDS variables and its install lines."""
    text = (PROJECT_ROOT / "Makefile").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.split(":=")[0].strip() in MAKEFILE_PIN_VARIABLES]
    assert len(lines) == len(MAKEFILE_PIN_VARIABLES), f"Makefile: expected {MAKEFILE_PIN_VARIABLES} once each"
    return [match.groups() for line in text.splitlines() if not line.startswith("#") for match in PIN.finditer(line)]


def setup_script_pins() -> list[tuple[str, str]]:
    """Pins anywhere in the Brev lifecycle script."""
    return [match.groups() for match in PIN.finditer((PROJECT_ROOT / "deploy/brev-setup.sh").read_text())]


def disagreements(source: str, pins: list[tuple[str, str]], env: dict[str, str]) -> list[str]:
    """One message per pin in `source` that environment.yml does not hold at the same version."""
    return [
        f"{name}: {source} pins {version}, environment.yml "
        + (f"pins {env[normalize(name)]}" if normalize(name) in env else "does not list it")
        for name, version in pins
        if env.get(normalize(name)) != version
    ]


SOURCES = {
    "pyproject.toml": pyproject_pins,
    "Makefile": makefile_pins,
    "deploy/brev-setup.sh": setup_script_pins,
}


def test_environment_pins_the_core_stack():
    pins = environment_pins()
    for name in ("torch", "transformers", "trl", "peft", "unsloth", "unsloth-zoo", "jupyterlab"):
        assert name in pins, f"environment.yml does not pin {name}"


def test_makefile_installs_the_test_only_packages_at_the_pinned_versions():
    env, pins = environment_pins(), {normalize(name): version for name, version in makefile_pins()}
    for name in TEST_ONLY_PACKAGES:
        assert name in env, f"environment.yml does not pin {name}"
        assert pins.get(name) == env[name], f"the Makefile does not install {name}=={env[name]}"


@pytest.mark.parametrize("source", SOURCES)
def test_pins_agree_with_environment(source):
    pins = SOURCES[source]()
    assert pins, f"{source}: no name==version pins found (has its format changed?)"
    problems = disagreements(source, pins, environment_pins())
    assert not problems, "; ".join(problems)


def test_disagreements_name_the_package_and_both_versions():
    env = {"nest-asyncio": "1.6.0", "torch": "2.13.0"}
    pins = [("nest_asyncio", "1.6.0"), ("torch", "2.14.0"), ("tyro", "1.0.17")]
    assert disagreements("Makefile", pins, env) == [
        "torch: Makefile pins 2.14.0, environment.yml pins 2.13.0",
        "tyro: Makefile pins 1.0.17, environment.yml does not list it",
    ]


def test_pin_pattern_skips_shell_comparisons():
    assert PIN.findall("install unsloth_zoo==2026.10.9 [[ $x == 1 ]]") == [("unsloth_zoo", "2026.10.9")]
