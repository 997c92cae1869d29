"""fedortho/ holds the mathematics and training: no Flower anywhere; only cli.py calls into server/."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "fedortho"
FORBIDDEN = ("flwr", "server", "client")  # flwr_datasets is a separate package without flwr


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_never_imports_flower_or_the_apps():
    offenders = {}
    files = list(LIBRARY.rglob("*.py"))
    assert len(files) >= 10
    for path in files:
        allowed = ("server",) if path.name == "cli.py" else ()  # the entry point starts the apps
        bad = [m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN and m.split(".")[0] not in allowed]
        if bad:
            offenders[str(path.relative_to(LIBRARY))] = bad
    assert offenders == {}
    assert "server.simulation" in imported_modules(LIBRARY / "cli.py")  # the check sees lazy imports
