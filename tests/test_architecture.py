"""The layering of docs/architecture.md and "no reach-throughs", enforced (issue 10 item 7).

* The import-linter contract in pyproject.toml (``[tool.importlinter]``): a module imports
  only from its own layer or the layers below it.
* An AST walk over the package and the bench scripts: no module touches another's
  ``_private`` attribute (``x._name`` where ``x`` is not ``self`` / ``cls``, a class of the
  same module, or a local made by one of them) or imports a private name from another
  module.  What is left today is :data:`ALLOWLIST`, each entry naming the issue 10 item that
  removes it; :func:`test_every_allowlist_entry_is_still_present` makes the list shrink as
  those land.

Each check has a negative control that feeds it a violation and sees it reported.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "virtio_lm"
SCANNED = [PACKAGE, REPO / "bench"]


# =========================================================================== import-linter
def _lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` (this interpreter's) in ``cwd`` (its pyproject.toml) over the package
    under ``src``."""
    cmd = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([*cmd, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    r = _lint_imports(REPO, REPO / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def _copy_package(tmp_path: Path) -> Path:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    copy = tmp_path / "src" / "virtio_lm"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """Negative control: the same contract over a copy of the package in which wire/ imports
    host/ must break."""
    codec = _copy_package(tmp_path) / "wire" / "codec.py"
    codec.write_text(codec.read_text() + "\nimport virtio_lm.host.qmp  # an upward import\n")
    r = _lint_imports(tmp_path, tmp_path / "src")
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout and "virtio_lm.wire.codec -> virtio_lm.host.qmp" in r.stdout, r.stdout


def test_the_layers_contract_catches_a_module_in_no_layer(tmp_path):
    """Negative control: the contract is exhaustive, so a new top-level module must be given
    its layer (here and in docs/architecture.md)."""
    (_copy_package(tmp_path) / "stray.py").write_text("X = 1\n")
    r = _lint_imports(tmp_path, tmp_path / "src")
    assert r.returncode != 0, r.stdout
    assert "virtio_lm.stray" in r.stdout + r.stderr, r.stdout + r.stderr


def _diagram_layers(doc: str) -> list[tuple[list[str], bool]]:
    """The layer rows of the first fenced block of docs/architecture.md: (names, independent)."""
    diagram = doc.split("```", 2)[1]
    rows = []
    for line in diagram.splitlines():
        if not line.startswith(" ") or line.startswith("  "):
            continue  # blank, or a continuation line
        column = line[1:].split("  ", 1)[0]  # the names, up to the description
        names = [n.strip().rstrip("/") for n in column.replace("|", ",").split(",")]
        rows.append((names, "|" in column))
    return rows


def _contract_layers() -> list[tuple[list[str], bool]]:
    import tomllib

    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return [([m.strip() for m in layer.replace("|", ":").split(":")], "|" in layer) for layer in contract["layers"]]


def _layers_agree(diagram: list[tuple[list[str], bool]], contract: list[tuple[list[str], bool]]) -> bool:
    """Same number of layers, in the same order, each row's names among its layer's (the
    diagram may leave minor top-level modules to a continuation line), same independence."""
    if len(diagram) != len(contract):
        return False
    return all(
        d[0] == c[0] and set(d) <= set(c) and d_ind == c_ind
        for (d, d_ind), (c, c_ind) in zip(diagram, contract)
    )


def test_the_contract_lists_the_layers_of_the_architecture_document():
    diagram = _diagram_layers((REPO / "docs" / "architecture.md").read_text())
    contract = _contract_layers()
    assert _layers_agree(diagram, contract), (diagram, contract)
    # negative controls: two layers swapped, a layer missing, a dropped independence mark
    swapped = [*diagram]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert not _layers_agree(swapped, contract)
    assert not _layers_agree(diagram[:-1], contract)
    assert not _layers_agree([(d, False) for d, _ in diagram], contract)


# =========================================================================== private reach-throughs
@dataclass(frozen=True)
class Finding:
    path: str  # relative to the repository
    line: int
    name: str  # the private name touched or imported
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


#: the public API of ``typing.NamedTuple`` / ``collections.namedtuple`` (underscored so as
#: not to clash with field names; documented, not private)
NAMEDTUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def _private(name: str) -> bool:
    """``_name``, but not ``__dunder__``, not ``_sunder_`` (Python's own: enum's ``_value_``)
    and not a named tuple's API."""
    if not name.startswith("_") or name.startswith("__") or name in NAMEDTUPLE_API:
        return False
    return not (name.endswith("_") and len(name) > 2)


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, tree: ast.Module) -> None:
        self.path = path
        self.classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.scopes: list[set[str]] = [{"self", "cls"} | self.classes]
        self.found: list[Finding] = []

    # ---------------------------------------------------------------- what counts as "own"
    def _makes_own(self, value: ast.expr) -> bool:
        """``Cls(...)``, ``cls(...)``, ``Cls.__new__(...)``, ``type(self)(...)``, ``copy.copy(self)``."""
        if not isinstance(value, ast.Call):
            return False
        f = value.func
        own = self.scopes[-1]
        if isinstance(f, ast.Name):
            return f.id in self.classes or f.id == "cls"
        if isinstance(f, ast.Attribute) and f.attr == "__new__" and isinstance(f.value, ast.Name):
            return f.value.id in self.classes or f.value.id == "cls"
        if isinstance(f, ast.Call) and isinstance(f.func, ast.Name) and f.func.id == "type":
            return bool(f.args) and isinstance(f.args[0], ast.Name) and f.args[0].id in own
        copier = f.attr if isinstance(f, ast.Attribute) and ast.unparse(f.value) == "copy" else getattr(f, "id", None)
        if copier in ("copy", "deepcopy"):
            return bool(value.args) and isinstance(value.args[0], ast.Name) and value.args[0].id in own
        return False

    def _annotated_own(self, ann: ast.expr | None) -> bool:
        if isinstance(ann, ast.Name):
            return ann.id in self.classes
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            return ann.value in self.classes
        return False

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        own = set(self.scopes[-1])
        args = node.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if self._annotated_own(a.annotation):
                own.add(a.arg)
        body = node.body if isinstance(node.body, list) else [node.body]
        for stmt in body:
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.Assign) and self._makes_own(sub.value):
                    own.update(t.id for t in sub.targets if isinstance(t, ast.Name))
        self.scopes.append(own)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    # ---------------------------------------------------------------- what is reported
    def _report(self, node: ast.AST, name: str, text: str) -> None:
        self.found.append(Finding(self.path, node.lineno, name, text))  # type: ignore[attr-defined]

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _private(node.attr) and not self._is_own(node.value):
            self._report(node, node.attr, ast.unparse(node))
        self.generic_visit(node)

    def _is_own(self, value: ast.expr) -> bool:
        if isinstance(value, ast.Name):
            return value.id in self.scopes[-1]
        return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if (
            isinstance(f, ast.Name) and f.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str) and _private(node.args[1].value)
            and not self._is_own(node.args[0])
        ):
            self._report(node, node.args[1].value, ast.unparse(node))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if _private(alias.name):
                self._report(node, alias.name, f"from {'.' * node.level}{node.module or ''} import {alias.name}")
        self.generic_visit(node)


def check_source(source: str, path: str = "<snippet>") -> list[Finding]:
    """Every private reach-through in ``source``."""
    tree = ast.parse(source)
    checker = _Checker(path, tree)
    checker.visit(tree)
    return checker.found


def scan() -> list[Finding]:
    out: list[Finding] = []
    for top in SCANNED:
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            out.extend(check_source(path.read_text(), rel))
    return out


#: (file, private name) still reached into today, each with the issue 10 item that removes it.
ALLOWLIST: dict[tuple[str, str], str] = {
}


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_no_module_reaches_into_another():
    found = [f for f in scan() if (f.path, f.name) not in ALLOWLIST]
    assert not found, "private reach-throughs:\n" + "\n".join(map(str, found))


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_every_allowlist_entry_is_still_present():
    """The allowlist only shrinks: an entry whose reach-through is gone must be deleted."""
    present = {(f.path, f.name) for f in scan()}
    stale = [entry for entry in ALLOWLIST if entry not in present]
    assert not stale, f"remove from ALLOWLIST (fixed): {stale}"


# --------------------------------------------------------------------------- negative controls
@pytest.mark.parametrize("snippet, names", [
    ("def f(fn):\n    with fn._lock:\n        pass\n", ["_lock"]),
    ("class A:\n    def f(self):\n        return self.fn._fd_lock\n", ["_fd_lock"]),
    ("from virtio_lm.virtqueue.driver import _InFlight, DriverQueue\n", ["_InFlight"]),
    ("from .driver import _InFlight\n", ["_InFlight"]),
    ("def f(dq):\n    dq._free = []\n", ["_free"]),
    ("def f(a):\n    return getattr(a, '_starts')\n", ["_starts"]),
    ("class A:\n    def f(self, other):\n        return other._x\n", ["_x"]),  # unannotated: unknown
    ("def f(x):\n    y = Other()\n    return y._z\n", ["_z"]),  # a class of another module
    ("import copy\ndef f(dq):\n    n = copy.copy(dq)\n    return n._free\n", ["_free"]),  # a copy of someone else's
    ("class A:\n    pass\ndef f():\n    return lambda b: b._q\n", ["_q"]),
])
def test_the_checker_reports_a_reach_through(snippet, names):
    assert [f.name for f in check_source(snippet)] == names


@pytest.mark.parametrize("snippet", [
    "class A:\n    def f(self):\n        return self._x\n",
    "class A:\n    @classmethod\n    def f(cls):\n        return cls._registry\n",
    "class A:\n    _n = 0\ndef f():\n    return A._n\n",
    "class A:\n    @classmethod\n    def make(cls):\n        a = cls.__new__(cls)\n        a._x = 1\n        return a\n",
    "class A:\n    def copy(self):\n        b = A()\n        b._x = self._x\n        return b\n",
    "import copy\nclass A:\n    def clone(self):\n        b = copy.copy(self)\n        b._x = list(self._x)\n        return b\n",
    "class A:\n    def __eq__(self, other: 'A'):\n        return self._x == other._x\n",
    "class A:\n    def f(self):\n        return super()._g()\n",
    "import enum\nclass E(enum.Enum):\n    X = 1\ndef f():\n    return E._value2member_map_, E.X._value_\n",
    "from virtio_lm.wire import codec\nx = codec.__name__\n",
    "def f(c):\n    return c._replace(head=1), c._asdict(), type(c)._fields\n",
    "def f(a):\n    return a.public\n",
])
def test_the_checker_passes_own_access(snippet):
    assert check_source(snippet) == []


def test_the_checker_reports_file_and_line():
    (f,) = check_source("x = 1\ny = z._w\n", "src/m.py")
    assert (f.path, f.line, f.name, str(f)) == ("src/m.py", 2, "_w", "src/m.py:2: z._w")
