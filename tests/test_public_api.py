"""The public surface: about ten names at the top, `functional.__all__` complete, no private imports
across modules, and ``import stabwatch`` light (no tracker, plotting or SNN library imported)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys

import stabwatch as sw
import stabwatch.functional as F

PACKAGE = pathlib.Path(sw.__file__).parent


def test_top_level_names() -> None:
    assert sorted(sw.__all__) == [
        "Alert",
        "AlertReason",
        "InstabilityError",
        "Monitor",
        "Severity",
        "Shadow",
        "StabilityMetrics",
        "StabwatchError",
        "alerts",
        "functional",
        "sinks",
    ]
    assert not hasattr(sw, "StabilityMonitor")  # the SNN drop-in lives in stabwatch.compat only
    from stabwatch.compat import StabilityMonitor

    assert StabilityMonitor.__module__ == "stabwatch.compat"


def test_functional_all_lists_every_public_function() -> None:
    modules = [F.activations, F.gradients, F.lyapunov, F.spectral, F.spiking]
    defined = {
        name
        for module in modules
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    }
    assert len(defined) >= 25
    assert defined <= set(F.__all__), sorted(defined - set(F.__all__))
    for name in F.__all__:
        assert callable(getattr(F, name)), name


def test_import_stabwatch_imports_no_extra() -> None:
    code = (
        "import sys, stabwatch; "
        "heavy = ('mlflow', 'wandb', 'matplotlib', 'tensorboard', 'snntorch', 'spikingjelly', 'norse', "
        "'lightning', 'transformers'); "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _private_imports() -> list[str]:
    found = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stabwatch"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(PACKAGE)}: from {node.module} import {alias.name}")
    return found


def test_no_private_name_is_imported_across_modules() -> None:
    assert _private_imports() == []
