"""pyproject.toml declares what the code imports: no more, no less.

Every import of the package (at any depth, in functions too) is resolved to
the installed distribution whose files hold the imported module, the way pip
would have to provide it. The package's runtime dependencies must be exactly
those distributions; what the tests and the benchmark import must be a
runtime or a ``dev`` dependency. An undeclared import works here only because
something else pulled it in; a declared one nothing imports is dead weight in
every agent image.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN = {"clovisor", "tests", "bench"}


def _name(requirement: str) -> str:
    """The normalised project name of a requirement string (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


@cache
def _owners() -> dict[str, str]:
    """Installed file (resolved path) -> the normalised name of its distribution."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        for f in dist.files or ():
            out[str(Path(str(dist.locate_file(f))).resolve())] = _name(dist.metadata["Name"])
    return out


def _module_file(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    return str(Path(spec.origin).resolve())


def _imports(root: Path) -> dict[str, set[str]]:
    """Third-party module imported -> the files importing it; ``from X import y``
    counts as ``X.y`` when that is a module (namespace packages such as
    ``google.rpc`` have no file of their own)."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
                modules += [f"{node.module}.{a.name}" for a in node.names
                            if _module_file(node.module) is None]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in OWN:
                    continue
                found.setdefault(module, set()).add(str(path.relative_to(REPO)))
    return found


def _distributions(root: Path) -> dict[str, set[str]]:
    """Distribution -> the modules of it imported under ``root``; unresolvable under ``?``."""
    out: dict[str, set[str]] = {}
    for module in _imports(root):
        origin = _module_file(module)
        if origin is None and "." in module:
            continue  # ``from pkg import name`` where name is not a module: pkg itself counts
        dist = _owners().get(origin or "", "?")
        out.setdefault(dist, set()).add(module)
    return out


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    return runtime, dev


def test_runtime_dependencies_are_exactly_what_the_package_imports() -> None:
    used = _distributions(REPO / "src" / "clovisor")
    assert "?" not in used, f"imports no installed distribution provides: {used['?']}"
    runtime, _ = _declared()
    assert set(used) - runtime == set(), {d: used[d] for d in set(used) - runtime}
    assert runtime - set(used) == set(), "declared but never imported"


def test_tests_and_bench_import_only_declared_distributions() -> None:
    runtime, dev = _declared()
    for root in ("tests", "bench"):
        used = _distributions(REPO / root)
        assert "?" not in used, f"{root}: imports nothing provides: {used['?']}"
        missing = set(used) - runtime - dev
        assert not missing, {d: used[d] for d in missing}


def test_the_check_resolves_namespace_packages() -> None:
    # google.rpc has no file of its own: the check must find the distribution
    # of the modules imported from it, or it would check nothing there.
    used = _distributions(REPO / "src" / "clovisor")
    assert "grpcio" in used and "googleapis-common-protos" in used, used
