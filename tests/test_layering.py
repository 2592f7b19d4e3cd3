"""No import loops between packages: no app imports a package that imports it back.

Every Python file of every top-level package (the apps and rpserver) is
parsed, and each import of another package is an edge, wherever it stands
(an import inside a function is still a dependency). Reading the source, not
importing it, sees every import and runs nothing.
"""

import ast
import collections
import functools

from conftest import ROOT

NOT_PACKAGES = {"tests", "bench", "scripts"}

# The project package is two things. Its settings, URLs, ASGI application,
# metrics and management commands put the apps together (they name, route,
# observe and start them): they may import any app, and no app imports them.
# The rest (errors, envelope, pipeline, streams, files, ...) is a library
# that the apps import, so it must import no app. The two are told apart
# here so that the first's imports do not count as the library's.
PROJECT_ROOT_MODULES = ("rpserver.settings", "rpserver.urls", "rpserver.asgi", "rpserver.wsgi",
                        "rpserver.metrics", "rpserver.management")
PROJECT_ROOT = "rpserver (settings, urls, asgi, metrics, commands)"

# Loops known today, each to go (none: the chat <-> statecache loop went when the blob format moved
# from chat/snapshots.py to statecache/blobs.py).
EXPECTED_LOOPS = set()


def packages():
    return sorted(path.parent.name for path in ROOT.glob("*/__init__.py") if path.parent.name not in NOT_PACKAGES)


def node(module):
    """The package a module counts for (the project package's root modules count apart)."""
    if module.startswith(PROJECT_ROOT_MODULES):
        return PROJECT_ROOT
    return module.split(".")[0]


def imported_modules(tree, module, is_package):
    """The absolute names of the modules a parsed file imports (relative imports resolved)."""
    for statement in ast.walk(tree):
        if isinstance(statement, ast.Import):
            yield statement.lineno, [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            if statement.level:
                parts = module.split(".")
                base = parts[:len(parts) - statement.level + (1 if is_package else 0)]
                name = ".".join(base + ([statement.module] if statement.module else []))
            else:
                name = statement.module
            # `from package import module` imports package.module: count both.
            yield statement.lineno, [name] + [f"{name}.{alias.name}" for alias in statement.names]


@functools.cache
def import_edges():
    """{(importer, imported): ["file:line module", ...]} between different packages."""
    names = set(packages())
    edges = collections.defaultdict(list)
    for package in names:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            is_package = path.name == "__init__.py"
            module = ".".join(relative.with_suffix("").parts[:-1] if is_package else relative.with_suffix("").parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(relative))
            for line, modules in imported_modules(tree, module, is_package):
                targets = {}  # the first module named for each package reached
                for imported in modules:
                    if imported.split(".")[0] in names:
                        targets.setdefault(node(imported), imported)
                for target, imported in targets.items():
                    if target != node(module):
                        edges[(node(module), target)].append(f"{relative}:{line} {imported}")
    return edges


def loops(edges):
    """{frozenset({a, b}): the imports each way} for every two packages that import each other."""
    return {frozenset(pair): (edges[pair], edges[pair[::-1]]) for pair in edges
            if pair[::-1] in edges and pair[0] < pair[1]}


def test_no_two_packages_import_each_other():
    edges = import_edges()
    found = loops(edges)
    unexpected = {pair: evidence for pair, evidence in found.items() if pair not in EXPECTED_LOOPS}
    assert not unexpected, "packages that import each other:\n" + "\n".join(
        " <-> ".join(sorted(pair)) + ":\n    " + "\n    ".join(forth + back)
        for pair, (forth, back) in unexpected.items())
    gone = EXPECTED_LOOPS - set(found)
    assert not gone, f"the expected loop(s) {[sorted(pair) for pair in gone]} are gone: remove them from EXPECTED_LOOPS"


def test_the_project_library_imports_no_app():
    edges = import_edges()
    apps = set(packages()) - {"rpserver"}
    reached = {target: where for (source, target), where in edges.items() if source == "rpserver" and target in apps}
    assert not reached, f"rpserver's library modules import apps: {reached}"


def test_the_checker_resolves_imports_and_finds_a_loop_it_is_shown():
    tree = ast.parse("from ..kernels import build\nfrom . import ops\nimport chat.snapshots\n")
    found = [name for _, names in imported_modules(tree, "inference.rwkv7.model", False) for name in names]
    assert found == ["inference.kernels", "inference.kernels.build", "inference.rwkv7", "inference.rwkv7.ops",
                     "chat.snapshots"]
    assert node("rpserver.management.commands.serve") == PROJECT_ROOT and node("rpserver.errors") == "rpserver"
    edges = {("chat", "statecache"): ["a"], ("statecache", "chat"): ["b"], ("web", "inference"): ["c"]}
    assert loops(edges) == {frozenset({"chat", "statecache"}): (["a"], ["b"])}
