"""The shape of the package, kept by tests: layers that point down and no import cycles
(import-linter's contracts in pyproject.toml), no module over 600 lines, module names that say
one thing, ruff's lint and format. CONTRIBUTING.md explains the layout these tests keep."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "lmforge"
MAX_LINES = 600

# Module names that appear in more than one folder, each with the reason it is one concept.
SHARED_NAMES = {
    "__init__.py": "package markers",
    "__main__.py": "`python -m lmforge.<package>` entry points",
    "config.py": "a config schema at two layers: the data group's (data/config.py) and the whole run's (config.py)",
    "winrate.py": "the win rate at two layers: its statistics and referees (eval/winrate.py), its command (winrate.py)",
}


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"`{name}` is not installed: install the test dependencies with pip install -e '.[dev]'")
    return path


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    """import-linter with the repository's contracts, on the `lmforge` found under `pythonpath`."""
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(pythonpath), "HOME": str(cwd)}
    return subprocess.run(
        [_tool("lint-imports"), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_hold():
    result = lint_imports(REPO, REPO / "src")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize(
    "where, line, broken",
    [
        # the backbone reaching up into a stage: a layer violation and a cycle between siblings
        (
            "model/heads.py",
            "from lmforge.algos import base as _up  # noqa",
            ["Layers point down BROKEN", "No import cycles"],
        ),
        # two modules of one package importing each other, lazily inside a function
        ("data/tokenizer.py", "def _f():\n    from lmforge.data import templates  # noqa", ["No import cycles"]),
    ],
)
def test_contracts_catch_an_upward_import_and_a_cycle(tmp_path, where, line, broken):
    """The contracts are not vacuous: a copy of the package with one bad import breaks them."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "lmforge", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "src" / "lmforge" / where
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    result = lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0, result.stdout[-3000:]
    for text in broken:
        assert text in result.stdout, result.stdout[-3000:]


def test_no_module_over_600_lines():
    long = {
        str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by responsibility (CONTRIBUTING.md): {long}"


def test_a_module_name_means_one_thing():
    by_name = defaultdict(list)
    for p in PACKAGE.rglob("*.py"):
        by_name[p.name].append(str(p.relative_to(PACKAGE)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1 and name not in SHARED_NAMES}
    assert not shared, (
        f"the same module name in several folders: {shared}; rename one, or add it to SHARED_NAMES with why"
    )


def test_ruff_lint_and_format():
    paths = ["src", "tests", "bench", "train.py"]
    lint = subprocess.run([_tool("ruff"), "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = subprocess.run([_tool("ruff"), "format", "--check", *paths], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, f"run `ruff format {' '.join(paths)}`:\n{fmt.stdout[-3000:]}"
