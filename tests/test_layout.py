"""The project's architecture, checked from the source with `ast`: no import cycle among its modules (function-local
imports included), imports run one way between layers, modules stay small and say their concern first."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOTS = ("tagi_jax", "tasks")
MAX_LINES = 400

# The layers, lowest first: a module may import its own layer's modules and lower layers', never a higher one's.
# `run` and `eval` share a layer: evaluation reads work directories through run.workdir, and the pipeline driver
# (run.pipeline) evaluates at the end of a run; the finer rules are in `test_run_and_eval_meet_only_where_intended`.
LAYERS = (
    ("tagi_jax.config", "tagi_jax.features", "tagi_jax.jsonl", "tagi_jax.vocab", "tagi_jax.metrics",
     "tagi_jax.partitioning", "tagi_jax.losses", "tagi_jax.decoding"),
    ("tasks",),
    ("tagi_jax.models", "tagi_jax.hf", "tagi_jax.export"),
    ("tagi_jax.trainer",),
    ("tagi_jax.data",),
    ("tagi_jax.run", "tagi_jax.eval"),
    ("tagi_jax.api", "tagi_jax.cli", "tagi_jax.init_files", "tagi_jax.init_plan", "tagi_jax.init_probe",
     "tagi_jax.init_wizard"),
)
# What `tasks` may import of the library (the feature contract and the JSON Lines reader).
TASKS_MAY_IMPORT = {"tagi_jax.features", "tagi_jax.jsonl"}
# Function-local imports of project modules are only allowed to keep a heavy optional dependency off the import
# path; none is needed today, so any is an error (add it here with the reason if one ever is).
ALLOWED_LOCAL_IMPORTS: set[tuple[str, str]] = set()


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: pathlib.Path | None = None) -> list[tuple[str, bool]]:
    """(imported project module, is the import inside a function) for every import statement of `module`."""
    path = path or MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]  # a module, or a name inside `base`
        else:
            continue
        for target in targets:
            resolved = _resolve(target) if target.split(".")[0] in ROOTS else None
            # A module's own package __init__ (run first by any import of it) is not an edge.
            if resolved and resolved != module and not module.startswith(resolved + "."):
                out.append((resolved, id(node) in local_nodes))
    return out


GRAPH = {m: sorted({t for t, _ in _imports(m)}) for m in MODULES}


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py: add it to LAYERS")


def test_every_module_has_a_layer():
    for module in MODULES:
        if module not in ("tagi_jax",):
            _layer(module)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(module, stack):
        state[module] = 1
        for dep in GRAPH[module]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_imports_run_one_way():
    wrong = []
    for module, deps in GRAPH.items():
        if module == "tagi_jax":
            continue
        for dep in deps:
            if dep != "tagi_jax" and _layer(dep) > _layer(module):
                wrong.append(f"{module} imports {dep} (a higher layer)")
            if module.startswith("tasks") and not dep.startswith("tasks") and dep not in TASKS_MAY_IMPORT:
                wrong.append(f"{module} imports {dep} (tasks may import only {sorted(TASKS_MAY_IMPORT)})")
    assert not wrong, "\n".join(wrong)


def test_run_and_eval_meet_only_where_intended():
    """Evaluation reads work directories (run.workdir and the tables it needs), never the training driver;
    only launch/train.py and run.pipeline's own tests drive training."""
    readable = {"tagi_jax.run.workdir", "tagi_jax.run.stages", "tagi_jax.run.defaults"}
    wrong = [f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith(("tagi_jax.eval", "tagi_jax.api"))
             for d in deps if d.startswith("tagi_jax.run") and d not in readable]
    wrong += [f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith("tagi_jax.run")
              and m != "tagi_jax.run.pipeline" for d in deps if d.startswith("tagi_jax.eval")]
    assert not wrong, "\n".join(wrong)
    launchers = {f"launch.{p.stem}": p for p in sorted((REPO / "launch").glob("*.py"))}
    drivers = sorted(m for m, deps in GRAPH.items() if "tagi_jax.run.pipeline" in deps)
    drivers += [m for m, p in launchers.items() if "tagi_jax.run.pipeline" in {t for t, _ in _imports(m, p)}]
    assert drivers == ["launch.train"], drivers


def test_no_function_local_imports_of_project_modules():
    local = [(m, t) for m in MODULES for t, is_local in _imports(m) if is_local and (m, t) not in ALLOWED_LOCAL_IMPORTS]
    assert not local, f"function-local imports of project modules (import them at module level): {local}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small_and_open_with_their_concern(module):
    path = MODULES[module]
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines (at most {MAX_LINES}): split it by concern"
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{path.relative_to(REPO)} opens with no docstring saying its concern"
    first_paragraph = doc.split("\n\n")[0]
    assert len(first_paragraph.splitlines()) <= 4, f"{path.relative_to(REPO)}: say the concern in a sentence or two"


def test_the_checker_sees_a_cycle_and_a_backward_import(tmp_path):
    """The checks above can fail: on a made-up tree with a cycle and an import against the layers."""
    (tmp_path / "tagi_jax" / "models").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tagi_jax" / "__init__.py").write_text('"""x."""\n')
    (tmp_path / "tagi_jax" / "models" / "__init__.py").write_text('"""x."""\n')
    (tmp_path / "tagi_jax" / "models" / "a.py").write_text('"""a."""\nfrom tagi_jax.models import b\n')
    (tmp_path / "tagi_jax" / "models" / "b.py").write_text('"""b."""\n\ndef f():\n    from tagi_jax.models import a\n')
    (tmp_path / "tagi_jax" / "losses.py").write_text('"""l."""\nimport tagi_jax.models.a\n')
    (tmp_path / "tasks" / "__init__.py").write_text('"""t."""\n')
    global REPO, MODULES, GRAPH
    saved = REPO, MODULES, GRAPH
    try:
        REPO = tmp_path
        MODULES = _modules()
        GRAPH = {m: sorted({t for t, _ in _imports(m)}) for m in MODULES}
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match="tagi_jax.losses imports tagi_jax.models.a"):
            test_imports_run_one_way()
        with pytest.raises(AssertionError, match="function-local"):
            test_no_function_local_imports_of_project_modules()
    finally:
        REPO, MODULES, GRAPH = saved
