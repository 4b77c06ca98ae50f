"""CI's oldest-versions run pins exactly the lower bounds pyproject.toml declares, no more and no less."""

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def declared_minimums() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                for r in extra)]
    lows: dict[str, Version] = {}
    for text in requirements:
        req = Requirement(text)
        bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(bounds) == 1, f"{text}: give every dependency one lower bound (>=)"
        name = canonicalize_name(req.name)
        assert lows.setdefault(name, bounds[0]) == bounds[0], f"{name} is declared with two lower bounds"
    return lows


def pinned() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line}: pin with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_constraints_file_pins_each_declared_lower_bound():
    assert pinned() == declared_minimums()


def test_ci_runs_the_suite_on_the_declared_minimums():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/min-versions.txt" in ci
