"""``python -m resnet_jax [NAME]``: list the models, or print one model's layer summary and parameter count."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_jax", description=__doc__)
    parser.add_argument("name", nargs="?", help="model name (omit to list all)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--depth", type=int, default=1, help="module nesting shown by the summary table")
    args = parser.parse_args(argv)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from resnet_jax import create_model, list_models, model_config

    if args.name is None:
        print("\n".join(list_models()))
        return 0
    try:
        overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(args.name, **overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    x = jnp.zeros((1, args.image_size, args.image_size, model.in_channels))
    print(nn.tabulate(model, jax.random.key(0), depth=args.depth, console_kwargs={"width": 120})(x))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    print(f"{args.name}: {sum(p.size for p in jax.tree.leaves(params)):,} parameters; config {model_config(args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
