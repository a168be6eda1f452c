"""outrunner.scaleset stands alone: it imports nothing else from outrunner, and the client and
the message session share a transport instead of importing each other's internals."""

from __future__ import annotations

import ast
from pathlib import Path

import outrunner.scaleset

PACKAGE = Path(outrunner.scaleset.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (``if TYPE_CHECKING:`` blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_package_imports_nothing_else_from_outrunner() -> None:
    outside = {
        (path.name, module)
        for path in PACKAGE.glob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] == "outrunner" and not module.startswith("outrunner.scaleset")
    }
    assert outside == set()


def test_client_and_session_do_not_import_each_other() -> None:
    assert "outrunner.scaleset.client" not in imported_modules(PACKAGE / "session.py")
    assert "outrunner.scaleset.session" not in imported_modules(PACKAGE / "_transport.py")
    assert "outrunner.scaleset.client" not in imported_modules(PACKAGE / "_transport.py")
    session_source = (PACKAGE / "session.py").read_text()
    assert "._send(" not in session_source
    assert "._actions_request(" not in session_source
