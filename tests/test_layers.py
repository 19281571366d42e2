"""The package's layer rule, read from the source: a module imports only its own layer and the layers below it,
module imports form no circle, and nothing but an entry point imports the CLI (snnet/README.md draws the layers)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "snnet"
#: lower layers first; a module may import its own layer and any layer before it
LAYERS = ("utils", "stitching", "data", "results", "train", "deploy", "explore", "serve")
#: layers side by side that must not import each other though the order above would allow it (serve sits beside
#: deploy: it may import utils, stitching, results, train and deploy, not explore)
APART = {("serve", "explore")}
#: the entry points: the only modules that may import the CLI (and any layer)
ENTRY = {"snnet.cli", "snnet.demo", "snnet.quickstart", "snnet.__main__"}
#: the Python API: above every layer (it fronts stitching, results, train and deploy), never imported by them, and like
#: them it does not import the CLI; the package root re-exports it lazily (on first use)
FACADE = {"snnet.api"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, name: str) -> set[str]:
    """Every snnet module `path` imports, at any depth (function-level imports count: they run too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "snnet"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "snnet":
                continue
            found.add(mod)
            for a in node.names:  # `from snnet.stitching import cut` imports the module snnet.stitching.cut
                if f"{mod}.{a.name}" in MODULES:
                    found.add(f"{mod}.{a.name}")
    return found


MODULES = modules()


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_every_library_module_is_in_a_layer():
    loose = [m for m in MODULES if layer_of(m) is None and m not in ENTRY | FACADE and m != "snnet"]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_upward_import():
    bad = []
    for name, path in MODULES.items():
        own = layer_of(name)
        if own is None:
            continue
        for dep in imports_of(path, name):
            if dep in ENTRY:
                bad.append(f"{name} imports the entry point {dep}")
            elif dep in FACADE:
                bad.append(f"{name} imports the Python API {dep} (import from the defining module)")
            elif dep == "snnet":
                bad.append(f"{name} imports the package root (import from the defining module)")
            elif (layer_of(dep) or 0) > own:
                bad.append(f"{name} ({LAYERS[own]}) imports {dep} ({LAYERS[layer_of(dep)]})")
            elif layer_of(dep) is not None and (LAYERS[own], LAYERS[layer_of(dep)]) in APART:
                bad.append(f"{name} ({LAYERS[own]}) imports {dep} ({LAYERS[layer_of(dep)]}), a layer beside it")
    assert not bad, "\n".join(bad)


def test_the_package_root_imports_only_the_method():
    deps = imports_of(MODULES["snnet"], "snnet")
    assert all(layer_of(d) in (0, 1) or d in FACADE for d in deps), deps


def test_the_python_api_imports_no_cli_and_import_snnet_stays_the_method():
    assert not imports_of(MODULES["snnet.api"], "snnet.api") & (ENTRY - {"snnet.demo"} | {"snnet.cli"})
    code = ("import sys, snnet; loaded = [m for m in sys.modules if m.startswith('snnet.')]; "
            "assert all(m.startswith(('snnet.stitching', 'snnet.utils')) for m in loaded), loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import snnet
    import snnet.api
    assert snnet.create_snnet is snnet.api.create_snnet and set(snnet.api.__all__) <= set(snnet.__all__)


def test_nothing_but_an_entry_point_imports_the_cli():
    users = [n for n, p in MODULES.items() if n not in ENTRY and "snnet.cli" in imports_of(p, n)]
    for path in [*ROOT.glob("stitching_*/*.py"), *ROOT.glob("benchmarks/*.py"), ROOT / "train.py"]:
        if "snnet.cli" in imports_of(path, "x.y"):
            users.append(str(path.relative_to(ROOT)))
    assert not users, users


def test_no_import_circle():
    graph = {n: {d for d in imports_of(p, n) if d in MODULES and d != n} for n, p in MODULES.items()}
    # a package's __init__ re-exporting its modules is no circle of the modules themselves
    for n in graph:
        graph[n] = {d for d in graph[n] if not (MODULES[d].name == "__init__.py" and n.startswith(d + "."))}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an upward import and a circle in a made-up tree are found."""
    src = tmp_path / "snnet" / "utils" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("from snnet.train.main import main\nfrom ..cli import main as m\n")
    deps = imports_of(src, "snnet.utils.x")
    assert "snnet.train.main" in deps and "snnet.cli" in deps
    assert layer_of("snnet.train.main") > layer_of("snnet.utils.x")


def test_no_private_name_is_imported_across_modules():
    """A module's private names (a leading underscore) are its own: another module imports only public names."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("snnet"):
                found += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found


@pytest.mark.parametrize("layer", ["utils", "stitching", "data", "results", "train", "explore", "explore/stitch_train",
                                   "deploy"])
def test_each_layer_lists_its_public_modules(layer):
    """A layer's __init__ (and stitch-train's package's) names its public modules (`__all__`), every one of them,
    and imports none."""
    init = ROOT / "snnet" / layer / "__init__.py"
    tree = ast.parse(init.read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], f"{init} imports"
    listed = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["__all__"])
    here = sorted(p.stem if p.is_file() else p.name for p in init.parent.iterdir()
                  if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file())
    assert sorted(listed) == here


def class_homes(paths) -> dict[str, list[str]]:
    """{class name: the files that define a class of that name} (nested classes included)."""
    homes: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                homes.setdefault(node.name, []).append(path.as_posix())
    return homes


def test_no_two_classes_share_a_name():
    """One word per concept (snnet/README.md's glossary): a class name names one thing in snnet/, so a
    reader (and a grep) never has to ask which `Prepared` or `Run` is meant."""
    shared = {name: where for name, where in class_homes(sorted(PKG.rglob("*.py"))).items() if len(where) > 1}
    assert not shared, f"class names defined more than once (give each its own word): {shared}"


def test_the_class_name_rule_catches_a_second_home(tmp_path):
    (tmp_path / "a.py").write_text("class Prepared:\n    pass\n")
    (tmp_path / "b.py").write_text("def f():\n    class Prepared:\n        pass\n")
    assert len(class_homes([tmp_path / "a.py", tmp_path / "b.py"])["Prepared"]) == 2


def class_fields(cls: ast.ClassDef) -> tuple[set[str], bool]:
    """A class's fields (its annotated class-level names and every `self.<name>` its methods assign) and whether it
    is an options class (a field declared with `option(...)`, the parsers' one declaration)."""
    names, options = set(), False
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
            options |= isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "option"
    for fn in ast.walk(cls):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.args.args and fn.args.args[0].arg == "self":
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                names |= {e.attr for t in targets for e in ast.walk(t) if isinstance(e, ast.Attribute)
                          and isinstance(e.value, ast.Name) and e.value.id == "self"}
    return names, options


#: the classes allowed more than 15 fields, and their cap: the run's one configuration (typed option sections and
#: what resolving them fills in) and the trainer, the one object that holds a training run's components (as
#: torchtitan's Trainer: network, optimizer, scaler, schedule, EMA, sampler, state, and train.py's data and records)
LARGE = {"snnet/train/options.py:RunOptions": 20, "snnet/train/trainer.py:Trainer": 25}


def test_no_class_but_an_options_class_has_more_than_15_fields():
    """A class of more than 15 fields mixes concerns (a training context once had 26: built components, progress,
    saved state and copied flags; the serving scheduler 32); options classes are the declared flags, and the
    classes in `LARGE` have caps of their own."""
    fields = {f"{path.relative_to(ROOT)}:{node.name}": class_fields(node) for path in sorted(PKG.rglob("*.py"))
              for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.ClassDef)}
    over = {name: len(names) for name, (names, options) in fields.items()
            if not options and len(names) > LARGE.get(name, 15)}
    assert not over, f"classes of more than 15 fields (split them by concern): {over}"
    assert set(LARGE) <= set(fields), "a class in LARGE no longer exists"


def test_the_field_count_sees_dataclass_fields_and_attributes():
    tree = ast.parse("class A:\n    x: int = 1\n    y: int = option(2)\n    def f(self):\n"
                     "        self.z = self.w = 0\n        self.x += 1\n")
    assert class_fields(tree.body[0]) == ({"x", "y", "z", "w"}, True)  # type: ignore[arg-type]
