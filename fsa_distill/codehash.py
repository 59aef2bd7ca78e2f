"""A stage's code version, computed rather than declared.

The version of a module is the hash of its normalised code: the AST with docstrings removed
(comments and formatting never reach the AST). A stage's closure is its module plus every project
module it imports, transitively, found by walking the AST (function-level imports count), plus
what a module declares in `__code_deps__` for what no import shows (a script run by path, a
backend picked by name at run time). So editing a helper re-keys exactly the stages that import
it, and a comment or docstring edit re-keys none.

The normalised code is `ast.unparse` of that tree, which names no AST fields, so the same
source gives the same digest on Python 3.11 and 3.12.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from collections.abc import Iterable
from functools import cache
from pathlib import Path

#: Only modules under these packages are followed: third-party code is pinned by the lock file.
PROJECT = "fsa_distill"
#: The runner, and the progress reporting every stage calls: not part of any stage's logic (they
#: write nothing a content hash covers), and an edit to them must not drop every cache.
EXCLUDED = frozenset(
    {
        "fsa_distill.tasks.stage",
        "fsa_distill.codehash",
        "fsa_distill.progress",
        "fsa_distill.locks",
        "fsa_distill.store",
        # FLOP counts and card peaks feed measurements only (tokens/s, MFU: outside every content
        # hash); a new card in its table must not retrain a 200k-step pretraining
        "fsa_distill.mfu",
    }
)


def _origin(module: str) -> Path | None:
    """The source file of a project module, or None if it is not one."""
    if module != PROJECT and not module.startswith(PROJECT + "."):
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0].value if body and isinstance(body[0], ast.Expr) else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def _parsed(path: Path, mtime_ns: int) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(digest of the normalised AST, names imported, names in `__code_deps__`) of one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imports: list[str] = []
    declared: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imports.append(node.module)
            imports.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__code_deps__" for t in node.targets
        ):
            declared.extend(ast.literal_eval(node.value))
    # `ast.unparse` of the tree without docstrings: comments and formatting never reach it, and unlike
    # `ast.dump` it names no node fields, which change between Python minors (a workdir copied to a
    # machine with another Python stays cached; should unparse ever differ, it only re-keys).
    normalised = ast.unparse(_strip_docstrings(tree))
    digest = hashlib.sha256(normalised.encode()).hexdigest()
    return digest, tuple(imports), tuple(declared)


def module_digest(module: str) -> str:
    """Digest of one module's normalised code."""
    path = _origin(module)
    if path is None:
        raise ValueError(f"{module!r} is not a module of the {PROJECT} package")
    return _parsed(path, path.stat().st_mtime_ns)[0]


def closure(modules: Iterable[str]) -> dict[str, str]:
    """Every project module reachable from `modules` by imports and `__code_deps__`, with its digest.

    A name in `__code_deps__` that is not a project module raises, so a stale declaration is noticed.
    """
    found: dict[str, str] = {}
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module in found or module in EXCLUDED:
            continue
        path = _origin(module)
        if path is None:
            continue
        digest, imported, declared = _parsed(path, path.stat().st_mtime_ns)
        found[module] = digest
        for name in declared:
            if _origin(name) is None:
                raise ValueError(f"{module}: __code_deps__ names {name!r}, which is not a module of {PROJECT}")
        pending.extend(imported)
        pending.extend(declared)
    return dict(sorted(found.items()))


def code_version(modules: Iterable[str]) -> str:
    """One digest for the closure of `modules`."""
    payload = "\n".join(f"{name} {digest}" for name, digest in closure(modules).items())
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
