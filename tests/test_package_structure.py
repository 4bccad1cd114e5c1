"""The package reads top to bottom: no import circle anywhere in resnet_jax, function-level imports included
(a lazy import is still a circle a reader has to untangle), and ops/ keeps its arrows pointing one way."""

import ast
from pathlib import Path

import resnet_jax

ROOT = Path(resnet_jax.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known) -> set[str]:
    """Every resnet_jax module ``name`` imports, at any level of the file. ``from package import x`` imports
    the module ``package.x`` when there is one, else the package itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return found & set(known)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package():
    edges = graph()
    assert "resnet_jax.ops.conv" in edges and "resnet_jax.ops.rules" in edges["resnet_jax.ops.conv"]
    found = cycles(edges)
    assert not found, "\n".join(" <-> ".join(c) + "\n  " + "\n  ".join(f"{m} imports {sorted(edges[m] & set(c))}"
                                                                       for m in c) for c in found)


def test_the_detector_sees_function_level_and_relative_imports():
    """A positive control: a circle closed by a lazy or relative import is found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    known = {"pkg.a": None, "pkg.b": None, "pkg": None}
    tree = Path(__file__).with_name("_circle_probe.py")
    tree.write_text("def f():\n    from .b import g\n    from pkg import a\n")
    try:
        assert imports("pkg.a", tree, known) == {"pkg.b", "pkg.a"}
    finally:
        tree.unlink()


def test_ops_knows_no_model():
    """ops/ is how a layer computes: it imports nothing of resnet_jax outside ops/ (no model, no weights, no
    training) but leaves that import nothing of it themselves (``atomic``), so no model module is ever imported
    from ops/ and no circle through a model can form. Positive control: the graph does see the models importing
    ops/."""
    edges = graph()
    ops = {m for m in edges if m == "resnet_jax.ops" or m.startswith("resnet_jax.ops.")}
    # leaves that import nothing of resnet_jax (writing a file whole), shared by ops/ and the rest
    neutral = {"resnet_jax.atomic"}
    assert all(not edges[m] for m in neutral), {m: edges[m] for m in neutral}
    outside = {m: sorted(edges[m] - ops - neutral) for m in sorted(ops) if edges[m] - ops - neutral}
    assert not outside, f"ops/ imports outside ops/: {outside}"
    assert "resnet_jax.ops" in edges["resnet_jax.resnet"] and "resnet_jax.blocks" in edges["resnet_jax.resnet"]
    assert len(ops) > 20


def test_ops_arrows_point_one_way():
    """The leaves stay leaves: what a convolution is (spec), the tuning file, the CPU's flags, the JAX compat
    table and the tracer import nothing of ops/; the algorithm modules never import the choice or the layer; the
    models never import an algorithm."""
    edges = graph()
    ops = {m for m in edges if m.startswith("resnet_jax.ops")}
    for leaf in ("resnet_jax.ops.spec", "resnet_jax.ops.tuning_cache", "resnet_jax.ops.cpu",
                 "resnet_jax.ops.jax_compat", "resnet_jax.ops.trace"):
        assert not edges[leaf] & ops, (leaf, edges[leaf])
    upper = {"resnet_jax.ops.conv", "resnet_jax.ops.rules", "resnet_jax.ops.linear", "resnet_jax.ops.tuning",
             "resnet_jax.ops.registry", "resnet_jax.ops"}
    for algorithm in ("xla", "gemm", "matmul_grad", "polyphase", "winograd", "onednn.algorithms"):
        assert not edges[f"resnet_jax.ops.{algorithm}"] & upper, algorithm
    for model in ("resnet_jax.resnet", "resnet_jax.blocks"):
        assert edges[model] & ops <= {"resnet_jax.ops", "resnet_jax.ops.rules"}, edges[model]
