"""Imports run one way: the layer table of docs/design.md ("Modules"), checked on the source.

Every module under src/mailshim is parsed with ``ast`` (nothing is imported) and every
``import`` of a mailshim module is read: at the top, inside functions (lazy imports, which
the sendmail fast path uses a lot) and under ``if TYPE_CHECKING:`` alike, since a type-only
import upwards is still a dependency upwards. A module may import its own layer or lower
ones, never a higher one; nothing outside ``mailshim.cli`` imports ``mailshim.cli``; and the
whole graph has no circle (which also orders the modules inside one layer). A module missing
from the table fails too, so a new module has to be placed in a layer (and in the doc).

The planted-violation tests copy the real tree, add one bad import and check the checker
names it, so a checker that had stopped seeing imports would fail here.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"

BASE, TEXT, CONFIG, STORE, ORCHESTRATION, CLI = range(6)
LAYER_NAMES = ("base", "text", "config", "store", "orchestration", "cli")

# The table docs/design.md shows (test_design_doc_table_matches checks that they agree).
LAYERS: dict[str, int] = {
    "mailshim": BASE,
    "mailshim.constants": BASE,
    "mailshim.errors": BASE,
    "mailshim.hostnames": BASE,
    "mailshim.paint": BASE,
    "mailshim.paths": BASE,
    "mailshim.tlsctx": BASE,
    "mailshim.address": TEXT,
    "mailshim.aliases": TEXT,
    "mailshim.argv": TEXT,
    "mailshim.journal": TEXT,
    "mailshim.logsummary": TEXT,
    "mailshim.maillog": TEXT,
    "mailshim.message": TEXT,
    "mailshim.reply": TEXT,
    "mailshim.smtpserver": TEXT,
    "mailshim.spoolfmt": TEXT,
    "mailshim.x509": TEXT,
    "mailshim.config": CONFIG,
    "mailshim.configcache": CONFIG,
    "mailshim.configload": CONFIG,
    "mailshim.sealed": CONFIG,
    "mailshim.bounce": STORE,
    "mailshim.fair": STORE,
    "mailshim.mailstats": STORE,
    "mailshim.pickup": STORE,
    "mailshim.policy": STORE,
    "mailshim.queuestats": STORE,
    "mailshim.relay": STORE,
    "mailshim.sendlimits": STORE,
    "mailshim.sessions": STORE,
    "mailshim.smtpconnect": STORE,
    "mailshim.smtpsession": STORE,
    "mailshim.spoolmarks": STORE,
    "mailshim.spool": STORE,
    "mailshim.spoolchoice": STORE,
    "mailshim.spoolentry": STORE,
    "mailshim.spoolfs": STORE,
    "mailshim.spoolindex": STORE,
    "mailshim.spoolsetup": STORE,
    "mailshim.ownview": STORE,
    "mailshim.wire": STORE,
    "mailshim.agent": ORCHESTRATION,
    "mailshim.removal": ORCHESTRATION,
    "mailshim.dropagent": ORCHESTRATION,
    "mailshim.bs": ORCHESTRATION,
    "mailshim.check": ORCHESTRATION,
    "mailshim.checkreport": ORCHESTRATION,
    "mailshim.configview": ORCHESTRATION,
    "mailshim.daemon": ORCHESTRATION,
    "mailshim.deadletters": ORCHESTRATION,
    "mailshim.metrics": ORCHESTRATION,
    "mailshim.monplugin": ORCHESTRATION,
    "mailshim.delivery": ORCHESTRATION,
    "mailshim.probe": ORCHESTRATION,
    "mailshim.queueview": ORCHESTRATION,
    "mailshim.queueselect": ORCHESTRATION,
    "mailshim.runpass": ORCHESTRATION,
    "mailshim.runner": ORCHESTRATION,
    "mailshim.serving": ORCHESTRATION,
    "mailshim.retrier": ORCHESTRATION,
    "mailshim.sink": ORCHESTRATION,
    "mailshim.submit": ORCHESTRATION,
    "mailshim.cli": CLI,
    "mailshim.cli.admin": CLI,
    "mailshim.cli.admin_spool": CLI,
    "mailshim.cli.checkqueue": CLI,
    "mailshim.cli.entry": CLI,
    "mailshim.cli.group": CLI,
    "mailshim.cli.queuerun": CLI,
    "mailshim.cli.sendmail": CLI,
}


def module_files(src: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the mailshim package under ``src``."""
    out = {}
    for path in sorted((src / "mailshim").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def mailshim_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mailshim modules ``name`` imports anywhere in its file (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # "from mailshim import spool" imports a module; "from mailshim.x import f" does not
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # "import mailshim.cli.sendmail" depends on the deepest module it names
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                found.add(target)
    return found


def import_graph(src: Path) -> dict[str, set[str]]:
    files = module_files(src)
    known = set(files)
    return {name: mailshim_imports(name, path, known) for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the modules on it (Tarjan's strongly connected parts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(src: Path, layers: dict[str, int] = LAYERS) -> list[str]:
    """One line per broken rule in the tree under ``src``; empty when the layering holds."""
    graph = import_graph(src)
    out = [
        f"{name} is in no layer: add it to LAYERS and docs/design.md"
        for name in graph
        if name not in layers
    ]
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target.startswith("mailshim.cli") and not name.startswith("mailshim.cli"):
                out.append(f"{name} imports {target}: nothing outside the cli imports the cli")
            elif name in layers and target in layers and layers[target] > layers[name]:
                out.append(
                    f"{name} ({LAYER_NAMES[layers[name]]}) imports {target}"
                    f" ({LAYER_NAMES[layers[target]]}): imports run downwards only"
                )
    out.extend(f"import circle: {' -> '.join(part)}" for part in circles(graph))
    return out


def test_every_module_is_placed_and_imports_run_one_way() -> None:
    assert violations(SRC) == []


def test_the_table_names_only_modules_that_exist() -> None:
    assert sorted(set(LAYERS) - set(module_files(SRC))) == []


def test_design_doc_table_matches() -> None:
    """docs/design.md's module table gives each module the layer enforced here."""
    rows = re.findall(r"^\| `([\w./]+)` \| (\w+) \|", DESIGN.read_text(encoding="utf-8"), re.M)
    documented = {}
    for file, layer in rows:
        dotted = "mailshim." + file.removesuffix(".py").replace("/", ".")
        documented[dotted.removesuffix(".__init__")] = layer
    assert documented == {name: LAYER_NAMES[layer] for name, layer in LAYERS.items()}


def _planted(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the real source tree with ``line`` appended to ``module``'s file."""
    src = tmp_path / "src"
    shutil.copytree(SRC / "mailshim", src / "mailshim", ignore=shutil.ignore_patterns("*.pyc"))
    path = src / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    return src


def test_a_planted_upward_import_is_found(tmp_path: Path) -> None:
    src = _planted(tmp_path, "mailshim.message", "\n\ndef _late():\n    from mailshim import spool")
    assert violations(src) == [
        "mailshim.message (text) imports mailshim.spool (store): imports run downwards only"
    ]


def test_a_planted_type_only_import_of_the_cli_is_found(tmp_path: Path) -> None:
    planted = "\nif TYPE_CHECKING:\n    from mailshim.cli.sendmail import main"
    src = _planted(tmp_path, "mailshim.runner", planted)
    assert violations(src) == [
        "mailshim.runner imports mailshim.cli.sendmail: nothing outside the cli imports the cli",
        # and since the cli imports the runner's callers, a circle closes through them
        "import circle: mailshim.agent -> mailshim.bs -> mailshim.cli.sendmail"
        " -> mailshim.runner -> mailshim.submit",
    ]


def test_a_planted_circle_inside_one_layer_is_found(tmp_path: Path) -> None:
    src = _planted(tmp_path, "mailshim.address", "from . import aliases as _aliases")
    assert violations(src) == ["import circle: mailshim.address -> mailshim.aliases"]


def test_a_new_module_must_be_placed(tmp_path: Path) -> None:
    src = _planted(tmp_path, "mailshim.errors", "")
    (src / "mailshim" / "newthing.py").write_text("from mailshim import errors\n")
    assert violations(src) == [
        "mailshim.newthing is in no layer: add it to LAYERS and docs/design.md"
    ]


def test_every_module_says_its_job_trust_and_what_it_raises() -> None:
    """STYLE: the docstring is the module's man page: its one job, then Trust, then Raises."""
    missing = []
    for name, path in module_files(SRC).items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if not doc.split("\n", 1)[0].strip():
            missing.append(f"{name}: no first line")
        missing.extend(f"{name}: no {word!r}" for word in ("Trust:", "Raises") if word not in doc)
    assert missing == []
