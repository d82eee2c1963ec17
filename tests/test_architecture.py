"""The package's shape, checked: layers only import downwards, no import circles, small modules, public names.

The layers follow the data path (README "Layout"):

    errors, constants, version             the bottom: everything may use them
    format, upstream.format                bytes <-> index, pure (no I/O, no torch work beyond dtypes)
    crypto, upstream.crypto                keys, sealing, header authentication, pure
    sources                                bytes at offsets: file, HTTP, S3, Hub (readers and writers)
    engine                                 plan, read, decrypt/verify, stage, copy; the serializer
    integrations, upstream (loading)       transformers, diffusers, Hub artifacts; upstream tensorizer helpers
    cli, bench, the package itself         on top

Inside ``integrations`` the same rule holds between its parts (docs/architecture.md):

    options, parallel, patches             base helpers
    artifact                               the artifact's rules: names, manifest, versions, routing, cache, writing
    loading                                what every adapter's load shares: weights, "disk" offload
    adapters.<library>                     one per library; no adapter imports another (diffusers may import
                                           transformers: its pipelines hold transformers models)
    switch, api, push, mixin, the package  entry points

Every ``import`` counts, also those inside functions: a lazy import that runs back up the order is still a
knot in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hf_tensorizer"

LAYERS: dict[str, int] = {
    "hf_tensorizer.errors": 0,
    "hf_tensorizer.constants": 0,
    "hf_tensorizer.version": 0,
    "hf_tensorizer.format": 1,
    "hf_tensorizer.upstream.format": 1,
    "hf_tensorizer.crypto": 2,
    "hf_tensorizer.upstream.crypto": 2,
    "hf_tensorizer.sources": 3,
    "hf_tensorizer.engine": 4,
    "hf_tensorizer.integrations": 5,
    "hf_tensorizer.upstream": 5,
    "hf_tensorizer.compat": 5,
    "hf_tensorizer.cli": 6,
    "hf_tensorizer.bench": 6,
    "hf_tensorizer.__main__": 6,
    "hf_tensorizer": 6,
}
MAX_LINES = 500

INTEGRATION_TIERS: dict[str, int] = {
    "hf_tensorizer.integrations.options": 0,
    "hf_tensorizer.integrations.parallel": 0,
    "hf_tensorizer.integrations.patches": 0,
    "hf_tensorizer.integrations.artifact": 1,
    "hf_tensorizer.integrations.loading": 2,
    "hf_tensorizer.integrations.adapters": 3,
    "hf_tensorizer.integrations": 4,  # the entry points: switch, api, push, mixin, the package
}
# adapters that may import another one: (importer, imported)
ADAPTER_EDGES = {("diffusers", "transformers")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _longest_prefix(module: str, table: dict[str, int]) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in table:
            return table[prefix]
    return None


def _layer(module: str) -> int:
    layer = _longest_prefix(module, LAYERS)
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def _adapter(module: str) -> str | None:
    """The library of an adapter module (``...adapters.transformers.load`` -> ``transformers``), else None."""
    prefix = "hf_tensorizer.integrations.adapters."
    return module[len(prefix) :].split(".")[0] if module.startswith(prefix) else None


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """``(imported module, line, names)`` for every import of an hf_tensorizer module in ``path``."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.startswith("hf_tensorizer")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_tensorizer"):
                continue
            names = [a.name for a in node.names]
            # ``from . import x`` imports the submodule x when there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            if subs:
                out += [(s, node.lineno, []) for s in subs]
                rest = [n for n in names if f"{target}.{n}" not in known]
                if rest:
                    out.append((target, node.lineno, rest))
            else:
                out.append((target, node.lineno, names))
    return out


def _graph() -> dict[str, list[tuple[str, int, list[str]]]]:
    mods = _modules()
    known = set(mods)
    return {m: [i for i in _imports(m, p, known) if i[0] != m] for m, p in mods.items()}


def test_every_module_is_in_a_layer() -> None:
    for module in _modules():
        _layer(module)


def test_no_import_runs_up_the_layers() -> None:
    bad = []
    for module, imports in _graph().items():
        for target, line, _ in imports:
            if _layer(target) > _layer(module):
                bad.append(f"{module}:{line} imports {target} (layer {_layer(module)} -> {_layer(target)})")
    assert not bad, "\n".join(bad)


def test_integrations_parts_import_downwards() -> None:
    """artifact never imports loading/adapters/entry points, loading never imports adapters, and so on."""
    bad = []
    for module, imports in _graph().items():
        tier = _longest_prefix(module, INTEGRATION_TIERS)
        if tier is None:
            continue
        for target, line, _ in imports:
            target_tier = _longest_prefix(target, INTEGRATION_TIERS)
            if target_tier is not None and target_tier > tier:
                bad.append(f"{module}:{line} imports {target} (tier {tier} -> {target_tier})")
    assert not bad, "\n".join(bad)


def test_adapters_do_not_import_each_other() -> None:
    bad = []
    for module, imports in _graph().items():
        library = _adapter(module)
        if library is None:
            continue
        for target, line, _ in imports:
            other = _adapter(target)
            if other not in (None, library) and (library, other) not in ADAPTER_EDGES:
                bad.append(f"{module}:{line} imports the {other} adapter ({target})")
    assert not bad, "\n".join(bad)


def test_each_part_of_integrations_is_a_package() -> None:
    """The tree names the concerns: no module but the entry points and base helpers sits at the top."""
    top = {p.stem for p in (ROOT / "integrations").glob("*.py")}
    assert top == {"__init__", "api", "push", "mixin", "options", "parallel", "patches"}, sorted(top)
    assert {p.name for p in (ROOT / "integrations").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "adapters",
        "artifact",
        "loading",
        "switch",
    }


def test_no_import_circles() -> None:
    graph = {m: sorted({t for t, _, _ in imps if t in _modules()}) for m, imps in _graph().items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
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

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_no_private_names_imported_across_modules() -> None:
    bad = []
    for module, imports in _graph().items():
        for target, line, names in imports:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{module}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_size(module: str) -> None:
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (> {MAX_LINES}): split it by concern"


def test_every_package_says_what_lives_there() -> None:
    for path in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 40, f"{path} needs a docstring saying what lives in the package"
