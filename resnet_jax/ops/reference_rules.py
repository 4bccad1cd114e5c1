"""A primitive's ``vmap`` and forward-mode rules taken from its jnp reference.

Why: the primitives that lower to the extension's C++ passes (``batchnorm_grad.py``, ``pool_grad.py``,
``fanout.py``) each have a jnp reference computing the same values, which is also how they evaluate off the
extension. A batched or twice-differentiated call of them is rare and never on a training step's hot path, so
the reference's own ``vmap``/``jvp`` are the rules: exact by construction, and one definition instead of one
per module.
"""

from __future__ import annotations

import functools

import jax

from resnet_jax.ops.jax_compat import instantiate_zeros


def batch_by_reference(reference, *, multiple_results: bool):
    """The batching rule: ``reference`` vmapped over the operands' batch axes, every result batched on axis 0.
    ``reference`` takes the operands positionally and the primitive's parameters by name."""
    def rule(args, dims, **params):
        out = jax.vmap(functools.partial(reference, **params), in_axes=dims)(*args)
        return (out, [0] * len(out)) if multiple_results else (out, 0)
    return rule


def jvp_by_reference(reference):
    """The forward-mode rule: ``reference``'s own JVP (absent tangents as zeros), which carries every higher
    order too."""
    def rule(primals, tangents, **params):
        tangents = [instantiate_zeros(t) for t in tangents]
        return jax.jvp(functools.partial(reference, **params), tuple(primals), tuple(tangents))
    return rule
