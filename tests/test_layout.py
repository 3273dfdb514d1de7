"""The package's shape: imports run one way (no cycle), leaf modules import nothing of resify,
and no module grows past the size where it is usually two jobs."""

import ast
from pathlib import Path

import networkx as nx

import resify

PACKAGE = Path(resify.__file__).resolve().parent  # the package under test: installed or in the work tree
LEAVES = {"resify.constants", "resify.formats", "resify.errors"}
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """resify modules that ``path`` imports at run time, anywhere in the file (function bodies too);
    imports under ``if TYPE_CHECKING:`` are for the type checker only and do not count."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("resify"):
                for alias in node.names:  # "from . import render" imports the module resify.views.cells
                    sub = f"{target}.{alias.name}"
                    found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("resify"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        g.add_node(_module_name(path))
        for target in _imports(path):
            g.add_edge(_module_name(path), target)
    return g


def test_the_import_graph_has_no_cycle():
    g = _graph()
    # a package's __init__ re-exports its modules: the edges into it from below are not cycles of jobs
    g.remove_nodes_from(["resify", "resify.__main__"])
    cycles = list(nx.simple_cycles(g))
    assert cycles == [], f"import cycles: {cycles}"


def test_the_graph_sees_the_imports_that_made_the_old_cycle():
    """The checker is not blind: it sees a function-level import and a module imported by name."""
    g = _graph()
    assert g.has_edge("resify.planning.sites", "resify.views.plan_table")  # inside Plan.__str__
    assert g.has_edge("resify.report.records", "resify.views.tables")  # "from ..views import plots, tables"
    assert not g.has_edge("resify.views.cells", "resify.planning.sites")  # only under TYPE_CHECKING


def test_leaf_modules_import_nothing_of_resify():
    g = _graph()
    assert {leaf: sorted(g.successors(leaf)) for leaf in LEAVES} == {leaf: [] for leaf in LEAVES}


def test_no_module_is_longer_than_450_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: n for k, n in lengths.items() if n > MAX_LINES} == {}


def test_the_public_api_is_pinned_and_dir_shows_only_it():
    expected = {
        "__version__",
        # convert, and the records a conversion hands back
        "apply", "plan", "applied_plan", "save", "load", "remove",
        "Plan", "Policy", "Site", "Identity", "Projection", "Dense", "Skipped", "SKIP_CODES",
        "WholeModule", "WHOLE_CODES", "ExistingShortcut", "Layer", "DualGraphModule", "Shortcut",
        # errors
        "ResifyError", "TraceError", "InputError", "PlanError", "RewriteError", "ModelLoadError", "ResifyWarning",
        # the report and watch
        "gradient_flow", "compare", "watch", "Watch", "GradientFlow", "FlowComparison", "LayerFlow", "LayerChange",
        "FlowHistory", "StepFlow", "VerdictChange", "VerdictTimeline",
    }  # fmt: skip
    assert set(resify.__all__) == expected and len(resify.__all__) == len(expected)
    assert dir(resify) == sorted(expected)
    for name in resify.__all__:
        assert getattr(resify, name) is not None, name
    assert callable(resify.watch) and resify.Watch.__name__ == "Watch"  # the function, not the module


#: the stage packages, in pipeline order, and the modules left at the top: the entry points and what
#: every stage shares
STAGES = ("tracing", "analysis", "planning", "rewriting", "report", "views", "cli")
TOP = {"__init__", "__main__", "api", "checkpoint", "constants", "errors", "formats", "ops", "state"}


def test_the_folder_shows_the_pipeline():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(STAGES)
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP
    for name in STAGES:  # each package says what its modules do
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        modules = {p.stem for p in (PACKAGE / name).glob("*.py")} - {"__init__"}
        assert all(f"``{m}``" in doc for m in modules), (name, sorted(m for m in modules if f"``{m}``" not in doc))
    # a package never shadows a public function: resify.plan, apply and watch stay the functions
    assert not set(STAGES) & set(resify.__all__)


def test_every_module_has_a_test_file_of_its_own():
    """tests/test_<module>.py, or tests/test_<package>.py for a package's main module (cli/commands)."""
    tests = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        package = path.parent.name
        if f"test_{path.stem}" not in tests and not (path.stem == "commands" and f"test_{package}" in tests):
            missing.append(str(path.relative_to(PACKAGE)))
    assert sorted(missing) == []
