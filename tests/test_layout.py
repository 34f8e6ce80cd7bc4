"""The package layout is the architecture, in floors: core (platform) < lib (shared libraries) < stages and
serving < flows (what runs stages) < bench < cli; a module imports only its own floor and those below.
Read from the source with ast; nothing is imported or run."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "grlm_ray"
HEAVY = {"ray", "vllm", "deepspeed", "torch", "transformers", "mlflow", "sentence_transformers", "faiss"}
# entry points whose imports stay in the functions so `grlm --help` needs nothing but argparse
LAZY_ENTRY_POINTS = ("grlm_ray.cli", "grlm_ray.bench")
# a Ray Serve application is Ray by nature (deployments are declared with @serve.deployment at import); it is
# imported only by `grlm serve` / Serve's import_path, after Ray is up
RAY_APPLICATIONS = {"grlm_ray.serving.app"}


def _name(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PKG.rglob("*.py")}


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(grlm_ray modules imported at module level, [(line, grlm_ray module) imported inside a function])."""
    tree = ast.parse(MODULES[module].read_text())
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name in MODULES]
        if isinstance(node, ast.ImportFrom) and node.module:
            return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                    for a in node.names if node.module.startswith("grlm_ray")]
        return []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child):
                    if t != module:
                        (local.append((child.lineno, t)) if in_function else top.add(t))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, local


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_the_top_level_shows_the_architecture():
    top = sorted(p.name for p in PKG.iterdir() if not p.name.startswith("_") and p.name != "__pycache__")
    assert top == ["bench", "cli.py", "core", "flows", "lib", "serving", "stages"]
    from grlm_ray.core.registry import REGISTRY

    # every stage module is a stage of the declared graph, and every record names a module in stages/
    stage_modules = {p.stem for p in (PKG / "stages").iterdir() if p.stem != "__init__" and p.name != "__pycache__"}
    assert {s.entry.split(":")[0].split(".")[2] for s in REGISTRY} == stage_modules


@pytest.mark.parametrize("module", sorted(MODULES))
def test_stages_never_import_each_other_and_nothing_else_imports_a_stage(module):
    top, local = _imports(module)
    mine = _stage_of(module)
    for target in top | {t for _, t in local}:
        theirs = _stage_of(target)
        if theirs is None or theirs == mine:
            continue
        # only the pipeline runs stages (through the registry's entry strings) and the benchmarks call them
        assert _layer(module) == "bench", f"{module} imports the stage module {target}"


def test_no_import_cycles_at_module_level():
    graph = {m: _imports(m)[0] for m in MODULES}

    def path_back(start: str) -> list[str] | None:
        todo, seen = [(start, [start])], set()
        while todo:
            node, path = todo.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in MODULES if (c := path_back(m))]
    assert not cycles, cycles[0]


def test_function_local_imports_are_only_for_entry_points_and_dispatch():
    """Internal modules import nothing heavy at module level (ray, torch, ... stay inside functions), so an
    internal import inside a function only hides structure: allowed in the CLI / benchmarks (fast --help)
    and in prepare's dispatch to its source readers."""
    heavy_at_top = []
    for m, p in MODULES.items():
        if m in RAY_APPLICATIONS:
            continue
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.Import):
                heavy_at_top += [(m, a.name) for a in node.names if a.name.split(".")[0] in HEAVY]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in HEAVY:
                heavy_at_top.append((m, node.module))
    assert not heavy_at_top, heavy_at_top
    hidden = [(m, line, t) for m in MODULES if not m.startswith(LAZY_ENTRY_POINTS)
              for line, t in _imports(m)[1] if not t.startswith(m + ".")]
    assert not hidden, hidden


FLOORS = {"core": 0, "lib": 1, "stages": 2, "serving": 2, "flows": 3, "bench": 4, "cli": 5}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in FLOORS))
def test_no_import_runs_back_up_a_floor(module):
    """Nothing imports a floor above its own, at module level or inside a function (the CLI dispatches to
    the benchmarks; the benchmarks never reach back into the CLI; core never needs lib)."""
    top, local = _imports(module)
    mine = FLOORS[_layer(module)]
    up = sorted(t for t in top | {t for _, t in local} if _layer(t) in FLOORS and FLOORS[_layer(t)] > mine)
    assert not up, f"{module} imports {up} from a floor above its own"
