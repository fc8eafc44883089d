"""The package layout follows the pipeline's data flow, and stays that way (docs/architecture.md).

Checked from the source: no import cycles; each package imports only packages of a lower layer, and only
those its `__init__` docstring lists under "May import:"; modules and functions stay small. And the reshape
changed no behaviour users can see: the public API, the old import paths (aliases that warn), the step
fingerprints of the committed demo run and of the default config, the CLI entry point.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "sails_fast"

# the layers, lowest first: a package may import only packages of a strictly lower layer (and itself)
LAYERS = {
    "core": 0,
    "kernels": 1,
    "sae": 1,
    "fused": 2,
    "integrations": 3,
    "data": 4,
    "models": 4,
    "sae_training": 5,
    # the pipeline steps, in data-flow order
    "pairs": 6,
    "statistics": 7,
    "selection": 8,
    "subspace": 9,
    "lora_init": 10,
    "training": 11,
    "evaluation": 12,
    "report": 13,
    # orchestration, the studies on top of it, the command line, the public API
    "pipeline": 14,
    "study": 15,
    "cli": 16,
    "__init__": 17,
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # lines of code, the docstring aside
LONG_MARK = "# long:"  # a function past MAX_FUNCTION_LINES says why on the line above its def


def _is_alias(path: Path) -> bool:
    return "from sails_fast._deprecated import alias" in path.read_text()


def _modules() -> dict[str, Path]:
    """{dotted name: path} of every library module, the deprecated aliases left out."""
    out = {}
    for path in sorted(LIB.rglob("*.py")):
        if _is_alias(path) or path.name == "_deprecated.py":
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "sails_fast.kernels" + ("" if path.stem == "__init__" else "." + path.stem)
        out[name] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(module: str) -> set[str]:
    """Library modules `module` imports, lazily or not (a name imported from a package counts as the package,
    or as its submodule when it is one)."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_pkg else -1]
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != module:
                found.add(t)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_package_has_a_layer():
    assert {_package(m) for m in MODULES} == set(LAYERS)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def test_packages_import_only_lower_layers():
    upward = [
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if _package(d) != _package(m) and LAYERS[_package(d)] >= LAYERS[_package(m)]
    ]
    assert upward == []


@pytest.mark.parametrize("package", sorted(p for p in LAYERS if (LIB / p / "__init__.py").exists()))
def test_package_docstring_says_what_lives_there_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((LIB / package / "__init__.py").read_text())) or ""
    match = re.search(r"May import: (.*?)\.?$", doc, re.S)
    assert match, f"sails_fast/{package}/__init__.py: no 'May import:' line"
    allowed = set(re.findall(r"sails_fast\.(\w+)", match.group(1)))
    assert "nothing" in match.group(1) or allowed, match.group(1)
    used = {_package(d) for m, deps in GRAPH.items() if _package(m) == package for d in deps} - {package}
    assert used <= allowed, f"{package} imports {sorted(used - allowed)}, not listed in its docstring"
    # the listed packages are below it, so the docstring cannot promise an upward import
    assert all(LAYERS[p] < LAYERS[package] for p in allowed), allowed


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}


def _code_lines(node: ast.AST) -> int:
    """A function's lines without its docstring (a long docstring is documentation, not complexity)."""
    body = node.body
    doc = (
        body[0]
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        else None
    )
    doc_lines = doc.end_lineno - doc.lineno + 1 if doc is not None and isinstance(doc.value.value, str) else 0
    return node.end_lineno - node.lineno + 1 - doc_lines


def test_long_functions_say_why():
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if _code_lines(node) > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith(LONG_MARK):
                unexplained.append(f"{module}.{node.name}: {_code_lines(node)} lines")
    assert unexplained == []


# ----- behaviour unchanged

PUBLIC_API = [
    "FusedLoraLinear", "lora_linear", "fuse_lora", "unfuse_lora", "is_fused", "FuseReport", "NF4Weight",
    "NF4LoraLinear", "quantize_nf4", "dequantize_nf4", "qlora_linear", "quantize_model_nf4", "SAEWeights",
    "load_sae", "sae_feature_stats", "FeatureStats", "SailsConfig", "SelectConfig", "SubspaceConfig",
    "InitConfig", "select_features", "build_subspace", "init_lora_from_subspace", "CollectConfig",
    "collect_feature_stats", "generate_unaligned", "TrainConfig", "train", "load_base_4bit", "EvalConfig",
    "EvalResult", "evaluate", "evaluate_before_after", "compare", "RefusalMatcher", "report", "__version__",
]  # fmt: skip


def test_public_api_unchanged():
    import sails_fast

    assert sorted(sails_fast.__all__) == sorted(PUBLIC_API)
    assert all(getattr(sails_fast, name) is not None for name in PUBLIC_API)


ALIASES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in LIB.rglob("*.py")
    if _is_alias(p)
)


def test_the_old_import_paths_are_all_kept():
    old = {"_backend", "_config", "demo", "embedded", "lora", "nf4", "ops", "roofline", "sae_stats", "stats"}
    old |= {"strategy", "theory"}
    old_sails = "artifacts baselines collect compare compare_outputs config evaluate init inputs pipeline"
    old_sails += " refusal report run_config run_data run_state select subspace train"
    expected = {f"sails_fast.{m}" for m in old} | {f"sails_fast.sails.{m}" for m in old_sails.split()}
    assert set(ALIASES) == expected | {"sails_fast.sails"}
    # these two kept their path as packages, and are not deprecated
    for name in ("sails_fast.sae", "sails_fast.sae_training"):
        assert not _is_alias(LIB / name.split(".")[1] / "__init__.py")


@pytest.mark.parametrize("old", ALIASES)
def test_old_import_path_warns_and_forwards_to_the_same_objects(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    path = (
        LIB / "sails" / "__init__.py" if old == "sails_fast.sails" else ROOT / (old.replace(".", "/") + ".py")
    )
    tree = ast.parse(path.read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "alias")
    homes, default = ast.literal_eval(call.args[1]), ast.literal_eval(call.args[2])
    for name, home in homes.items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name), name
    assert importlib.import_module(default)
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018


def test_step_fingerprints_unchanged():
    """The same config gives the same step fingerprints as before the reshape (tests/data, taken then), so
    existing run directories are reused, not recomputed. Config keys added since (loss_chunk_tokens,
    train.parallel) change no result and are left out of the fingerprints. sails.train.batch_size joined
    the train fingerprint on purpose (it sets the optimizer step); a run recorded before is brought up to
    date when the config it trained with (train/train_config.json) shows today's value
    (RunState._adopt_new_keys)."""
    from sails_fast.pipeline.config import RunConfig
    from sails_fast.pipeline.fingerprints import step_configs, step_fingerprints
    from sails_fast.pipeline.state import stable_hash

    golden = json.loads((ROOT / "tests" / "data" / "step_fingerprints.json").read_text())
    for name, want in golden["configs"].items():
        config = (
            RunConfig() if name == "default" else RunConfig.from_dict(json.loads((ROOT / name).read_text()))
        )
        assert {s: stable_hash(s, c) for s, c in step_configs(config).items()} == want["config_keys"], name
        assert step_fingerprints(config) == want["by_path"], name
        assert step_fingerprints(config, golden["digests"]) == want["with_digests"], name


def test_committed_run_config_reads_back_unchanged():
    from sails_fast.pipeline.config import RunConfig

    def common(new, old):  # keys added since the run was committed take their defaults
        if isinstance(old, dict):
            return {k: common(new[k], v) for k, v in old.items()}
        return new

    committed = json.loads((ROOT / "benchmarks" / "results" / "demo" / "config.json").read_text())
    assert common(RunConfig.from_dict(committed).to_dict(), committed) == committed


def test_version_and_entry_point():
    import sails_fast
    from sails_fast.core.version import __version__

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', pyproject, re.M).group(1) == __version__ == sails_fast.__version__
    target = re.search(r'^sails-fast = "(.+)"$', pyproject, re.M).group(1)
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
