"""The private and experimental JAX interfaces ops/ uses resolve in this jax, and a moved one stops the import
with one sentence naming it, this jax's version and the versions the table was checked with."""

import importlib.util
import inspect
import pathlib
import re

import jax
import pytest

from resnet_jax.ops import jax_compat

# The jax versions these tests were run against; jax_compat.CHECKED_WITH must name this one
CHECKED_WITH = ("0.10.2",)


def load_fresh_copy():
    """Execute jax_compat.py again as a new module, so a test sees what importing it would do now."""
    path = pathlib.Path(jax_compat.__file__)
    spec = importlib.util.spec_from_file_location("jax_compat_fresh_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_with_this_jax_and_every_name_resolves():
    assert jax.__version__ in CHECKED_WITH and jax_compat.CHECKED_WITH == CHECKED_WITH
    for ours, (module, attribute, why) in jax_compat.NAMES.items():
        assert getattr(jax_compat, ours) is getattr(importlib.import_module(module), attribute), ours
        assert why
    for ours, attribute, keywords in jax_compat.KEYWORDS:
        assert set(keywords) <= set(inspect.signature(getattr(getattr(jax_compat, ours), attribute)).parameters)


def private_imports(text: str) -> list[str]:
    """The import lines of ``text`` that reach a module the table resolves from (or jax._src, jax.interpreters),
    in either import form."""
    modules = {module for module, _, _ in jax_compat.NAMES.values()} | {"jax._src", "jax.interpreters"}
    dotted = "|".join(re.escape(m) for m in sorted(modules))
    leaves = "|".join(sorted({m.rpartition(".")[2] for m in modules}))
    pattern = (rf"^\s*(?:from|import)\s+(?:{dotted})\b.*$"
               rf"|^\s*from\s+jax(?:\.\w+)*\s+import\s+.*\b(?:{leaves})\b.*$")
    return re.findall(pattern, text, re.M)


def test_nothing_else_in_ops_touches_the_private_interfaces():
    """The table is the only place: no other file of ops/ imports a module the table resolves from."""
    assert private_imports("from jax._src.core import x\nfrom jax.interpreters import ad\nimport jax\n"
                           "from jax.experimental import custom_partitioning\n") == [
        "from jax._src.core import x", "from jax.interpreters import ad",
        "from jax.experimental import custom_partitioning"]  # the detector's positive control
    root = pathlib.Path(jax_compat.__file__).parent
    found = {str(path.relative_to(root)): private_imports(path.read_text()) for path in root.rglob("*.py")
             if path.name != "jax_compat.py"}
    assert not {k: v for k, v in found.items() if v}


@pytest.mark.parametrize("ours", sorted(jax_compat.NAMES))
def test_a_moved_name_is_a_clear_import_error(ours, monkeypatch):
    module, attribute, _ = jax_compat.NAMES[ours]
    monkeypatch.delattr(importlib.import_module(module), attribute)
    with pytest.raises(ImportError) as caught:
        load_fresh_copy()
    message = str(caught.value)
    assert f"needs {module}.{attribute} (" in message
    assert f"jax {jax.__version__} does not have" in message and "checked with jax 0.10.2" in message


def test_a_dropped_keyword_is_a_clear_import_error(monkeypatch):
    """custom_partitioning without ``sharding_rule=`` would lose the extension's sharding rule: refused."""
    cp = jax_compat.custom_partitioning

    def old_def_partition(self, partition, infer_sharding_from_operands=None, propagate_user_sharding=None,
                          decode_shardings=True):
        pass

    monkeypatch.setattr(cp, "def_partition", old_def_partition)
    with pytest.raises(ImportError, match=r"needs the keyword sharding_rule= of "
                                          r"jax\.experimental\.custom_partitioning\.custom_partitioning\."
                                          r"def_partition .*checked with jax 0\.10\.2"):
        load_fresh_copy()
