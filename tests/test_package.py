"""Package hygiene: the layering rules of DESIGN.md/STYLE.md, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["cineray", "cineray.models", "cineray.pipelines", "cineray.cluster", "cineray.jobs"]


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in a file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offending(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_models_are_plain_torch():
    banned = ("ray", "deepspeed", "omegaconf", "torch.distributed")
    assert _offending("models", banned) == []


def test_pipelines_know_nothing_of_ray():
    assert _offending("pipelines", ("ray", "deepspeed", "torch.distributed")) == []


def test_library_code_never_calls_ray_init():
    """Entry points (the CLI, `python -m cineray.jobs.*`) start Ray; library modules never do."""
    calls = []
    for folder in ("cineray", "models", "pipelines", "cluster"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("cli.py", "__main__.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                f = node.func if isinstance(node, ast.Call) else None
                if isinstance(f, ast.Attribute) and f.attr == "init" and _name(f.value) == "ray":
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def _name(node) -> str:
    return node.id if isinstance(node, ast.Name) else ""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_importing_models_pulls_in_no_ray_or_xformers():
    code = (
        "import importlib, pkgutil, sys\n"
        "import cineray.models as m\n"
        "for info in pkgutil.walk_packages(m.__path__, 'cineray.models.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'xformers', 'deepspeed'))\n"
        "print(bad)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_module_imports(package):
    """Each subpackage and every module in it imports in a fresh interpreter."""
    code = (
        "import importlib, pkgutil\n"
        f"p = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_subpackages_map_to_their_folders():
    """cineray.models lives in models/, ...; no bare `models` or `jobs` module is installed."""
    import importlib

    folders = ["cineray", "models", "pipelines", "cluster", "jobs"]
    for package, folder in zip(SUBPACKAGES, folders, strict=True):
        module = importlib.import_module(package)
        assert Path(module.__file__).parent == ROOT / folder
    code = "import importlib.util as u; print([u.find_spec(n) for n in ('models', 'jobs')])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.stdout.strip() == "[None, None]", proc.stderr
