"""The install's promises: ranges in pyproject.toml, the tested set in constraints.txt.

`make install` installs pyproject.toml's ranges constrained to constraints.txt; these tests keep
the two files consistent with each other and with the environment the suite runs in.
"""

import importlib.metadata
import pathlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for name, extra in project["optional-dependencies"].items():
        if name not in ("cuda12", "cuda13", "tpu"):
            reqs += [Requirement(r) for r in extra]
    return reqs


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert m, f"constraints.txt: not a pin: {line!r}"
        pins[_norm(m.group(1))] = Version(m.group(2))
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_is_a_range_with_a_pin_inside_it():
    pins = _pins()
    for req in _requirements():
        spec = str(req.specifier)
        assert "==" not in spec, f"{req}: pyproject.toml states ranges; pins go to constraints.txt"
        assert ">=" in spec, f"{req}: no lower bound"
        name = _norm(req.name)
        assert name in pins, f"{req.name} is required but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {spec}")


def test_accelerator_extras_follow_the_jax_range():
    project = _pyproject()["project"]
    jax = next(Requirement(r) for r in project["dependencies"] if r.startswith("jax>"))
    for extra in ("cuda12", "cuda13", "tpu"):
        (req,) = [Requirement(r) for r in project["optional-dependencies"][extra]]
        assert req.name == "jax" and req.extras == {extra}
        assert req.specifier == jax.specifier, f"moetx[{extra}] pins another JAX than the core"


def test_torchvision_is_pinned_beside_the_torch_it_was_built_for():
    """torchvision's wheel requires the exact torch it was compiled against; a mismatched pair
    installs but fails at import (missing operators)."""
    pins = _pins()
    try:
        requires = importlib.metadata.requires("torchvision") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchvision is not installed")
    (torch_req,) = [Requirement(r) for r in requires if Requirement(r).name == "torch"]
    assert torch_req.specifier.contains(pins["torch"]), (torch_req, pins["torch"])


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_the_suite_runs_on_the_tested_set(req):
    """The environment running the tests is the one constraints.txt describes."""
    try:
        installed = Version(importlib.metadata.version(req.name))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{req.name} is not installed (an extra this environment does not have)")
    assert installed == _pins()[_norm(req.name)], (
        f"{req.name} {installed} is installed, constraints.txt says {_pins()[_norm(req.name)]}: "
        "run `make install-test`")
