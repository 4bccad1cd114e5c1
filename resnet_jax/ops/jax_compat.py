"""Every JAX interface ops/ uses that is private, internal or experimental, resolved here and nowhere else.

Why one module: these names move between jax releases without a deprecation period. Resolved in one place, a
moved name stops the import at once with one sentence naming the jax version, the missing name and the versions
this table was checked with, instead of an ``AttributeError`` deep inside a lowering, or a sharding rule
silently dropped. It lives in ops/ because only ops/ needs it, and ops/ imports nothing outside itself.

To support a new jax: run tests/test_jax_compat.py against it, fix the table, add the version to ``CHECKED_WITH``.
"""

from __future__ import annotations

import importlib
import inspect

import jax

CHECKED_WITH = ("0.10.2",)  # the jax versions the table below was checked against (tests/test_jax_compat.py)

# our name: (module, attribute, why ops/ needs it)
NAMES = {
    "Primitive": ("jax.extend.core", "Primitive", "the three convolution passes are primitives (linear.py)"),
    "ShapedArray": ("jax.core", "ShapedArray", "their abstract evaluation"),
    "defbilinear": ("jax.interpreters.ad", "defbilinear", "their forward-mode rules and transposes"),
    "primitive_batchers": ("jax.interpreters.batching", "primitive_batchers", "their vmap rules"),
    "register_lowering": ("jax.interpreters.mlir", "register_lowering", "their lowering"),
    "lower_fun": ("jax.interpreters.mlir", "lower_fun", "their lowering, from the algorithms' jnp code"),
    "prims_requiring_devices": ("jax._src.dispatch", "prim_requires_devices_during_lowering",
                                "the private registry of primitives lowered with their devices (sharding rules)"),
    "custom_partitioning": ("jax.experimental.custom_partitioning", "custom_partitioning",
                            "the extension's batch-parallel sharding rule (onednn/calls.py)"),
    "sequential_vmap": ("jax.custom_batching", "sequential_vmap", "vmap of a partitioned extension call"),
    "SymbolicZero": ("jax.custom_derivatives", "SymbolicZero", "the custom_jvp rules skip absent tangents"),
    "primitive_jvps": ("jax.interpreters.ad", "primitive_jvps",
                       "the forward mode of BatchNorm's and the max-pool's gradient primitives"),
    "primitive_transposes": ("jax.interpreters.ad", "primitive_transposes",
                             "BatchNorm's and the max-pool's tangent maps transpose to their C++ backward "
                             "(batchnorm_grad.py, pool_grad.py)"),
    "is_undefined_primal": ("jax.interpreters.ad", "is_undefined_primal", "which operands a transpose gets"),
    "instantiate_zeros": ("jax.interpreters.ad", "instantiate_zeros", "absent tangents and cotangents"),
    "Zero": ("jax.interpreters.ad", "Zero", "the fan-out primitives' absent tangents and cotangents (fanout.py)"),
}
# keyword arguments of a resolved callable that ops/ passes: (our name, attribute path inside it, keywords)
KEYWORDS = (("custom_partitioning", "def_partition", ("sharding_rule", "reduction_factors")),)


class JaxVersionUnsupported(ImportError):
    """This jax moved or dropped an interface ops/ needs."""


def _missing(what: str, why: str) -> JaxVersionUnsupported:
    return JaxVersionUnsupported(
        f"resnet_jax.ops needs {what} ({why}), which jax {jax.__version__} does not have; resnet_jax was checked "
        f"with jax {', '.join(CHECKED_WITH)}: install one of those (pip install jax=={CHECKED_WITH[-1]}) or "
        "update resnet_jax/ops/jax_compat.py")


def resolve(module: str, attribute: str, why: str):
    """``module.attribute``, or ``JaxVersionUnsupported`` naming it."""
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        raise _missing(f"{module}.{attribute}", why) from None


def check_keywords(owner: str, function, names: tuple[str, ...]) -> None:
    """``JaxVersionUnsupported`` unless ``function`` takes every keyword in ``names``."""
    parameters = inspect.signature(function).parameters
    for name in names:
        if name not in parameters:
            raise _missing(f"the keyword {name}= of {owner}", "the extension's sharding rule")


_resolved = {ours: resolve(*where) for ours, where in NAMES.items()}
for _ours, _attribute, _keywords in KEYWORDS:
    _owner = f"{NAMES[_ours][0]}.{NAMES[_ours][1]}.{_attribute}"
    check_keywords(_owner, getattr(_resolved[_ours], _attribute), _keywords)

Primitive = _resolved["Primitive"]
ShapedArray = _resolved["ShapedArray"]
defbilinear = _resolved["defbilinear"]
primitive_batchers = _resolved["primitive_batchers"]
register_lowering = _resolved["register_lowering"]
lower_fun = _resolved["lower_fun"]
prims_requiring_devices = _resolved["prims_requiring_devices"]
custom_partitioning = _resolved["custom_partitioning"]
sequential_vmap = _resolved["sequential_vmap"]
SymbolicZero = _resolved["SymbolicZero"]
primitive_jvps = _resolved["primitive_jvps"]
primitive_transposes = _resolved["primitive_transposes"]
is_undefined_primal = _resolved["is_undefined_primal"]
instantiate_zeros = _resolved["instantiate_zeros"]
Zero = _resolved["Zero"]
