"""Starting weights for fine-tuning (``config.init_from``): a torchvision file, another run's workdir, or
published weights by name (``"resnet50.IMAGENET1K_V2"``, ``"resnet50.a1_in1k"``: ``resnet_jax.pretrained``, which
downloads them once, or reads ``config.weights_file``, a local copy).

Every parameter and BatchNorm statistic is taken from the source except the classifier head when the class
count differs or the source has none, which keeps its fresh initialisation (the usual fine-tuning recipe).
Anything else that does not match is listed in one error instead of being silently re-initialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

HEAD = "fc"


def check_init_from(config) -> Path | str | None:
    """The starting-weights file or workdir, checked to exist (before a run writes or compiles anything), or
    the published weights' name (``validate`` has checked that it names some)."""
    from resnet_jax.training.config import published_weights

    if not config.init_from:
        if config.get("init_from_step", "") != "" or config.get("init_from_ema", False):
            raise ValueError("config.init_from_step/init_from_ema choose among the checkpoints of the run "
                             "config.init_from names, which is empty; set it to that run's workdir")
        return None
    if published_weights(config.init_from) is not None:
        if config.get("weights_file") and not Path(config.weights_file).expanduser().is_file():
            raise FileNotFoundError(f"config.weights_file={config.weights_file!r} is not a file; give the path of "
                                    f"a local copy of {config.init_from}'s weights")
        _check_checkpoint_choice(config, "published weights, one set")
        return config.init_from
    source = Path(config.init_from).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"config.init_from={config.init_from!r} does not exist; give a torchvision "
                                ".pth/.safetensors file or the workdir of an earlier run")
    _check_checkpoint_choice(config, None if source.is_dir() else "a file, which holds one set of weights")
    return source


def _check_checkpoint_choice(config, not_a_run: str | None) -> None:
    """``init_from_step``/``init_from_ema`` pick among a run's checkpoints, as ``train.export``'s ``--step`` and
    ``--use_ema`` do; set for a file or published weights (``not_a_run`` says which) they would be ignored."""
    step, ema = config.get("init_from_step", ""), config.get("init_from_ema", False)
    if not_a_run and (step != "" or ema):
        raise ValueError(f"config.init_from_step/init_from_ema choose among a run's checkpoints, but "
                         f"config.init_from={config.init_from!r} is {not_a_run}; leave them unset")
    if not (step == "" or step == "best" or str(step).isdigit()):
        raise ValueError(f"config.init_from_step={step!r} is not a step: give a step number, 'best' (the highest "
                         "validation accuracy) or leave it empty for the latest checkpoint")


def initial_variables(config, model, input_shape, log: Callable[[str], None],
                      start_from: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Variables to start from, or ``None`` for a fresh initialisation. Only a run that starts at step 0 reads
    them; a resumed one takes everything from its checkpoint. ``start_from``: variables in memory (a
    ``Classifier``'s own, which ``fit`` continues from), used instead of ``config.init_from``."""
    source = "the weights given" if start_from is not None else check_init_from(config)
    if source is None:
        return None
    if start_from is not None:
        loaded = jax.device_get(start_from)
    elif isinstance(source, str):
        loaded = _published_variables(config, model, source)
    elif source.is_dir():
        loaded, source = _run_variables(config, model, source)
    else:
        loaded = _torchvision_variables(config, model, source)
    fresh = jax.jit(lambda: model.init(jax.random.PRNGKey(config.seed), jnp.zeros(input_shape), train=False))()
    merged, replaced = merge_pretrained(jax.device_get(fresh), loaded)
    log(f"initialised from {source}" + (f" (new head: {', '.join(replaced)})" if replaced else ""))
    return merged


def _run_variables(config, model, source: Path) -> tuple[dict[str, Any], str]:
    """Another run's (or a saved model's) weights: the checkpoint ``init_from_step`` picks (the latest by
    default, as ``train.export`` takes), its moving average with ``init_from_ema``; the RGB first convolution
    adapted to the model's ``in_channels`` as a torchvision file's is. Returns them and how the log names them."""
    from resnet_jax.checkpoint import load_variables

    step = config.get("init_from_step", "") or None
    _, loaded, _ = load_variables(source, step=step, use_ema=config.get("init_from_ema", False))
    which = [f"{'the best' if step == 'best' else 'the latest' if step is None else f'the step {step}'} checkpoint"]
    which += ["its moving average"] if config.get("init_from_ema", False) else []
    if _adapt_first_convolution(loaded, model.in_channels):
        which.append(f"the first convolution adapted to {model.in_channels} input channels")
    return loaded, f"{source} ({', '.join(which)})"


def _adapt_first_convolution(variables: dict[str, Any], in_channels: int) -> bool:
    """An RGB run's first kernel (Flax's (kh, kw, 3, O), ``conv1`` or the deep stem's ``conv1_0``) for a model of
    other input channels, by ``torchvision.adapt_input_conv`` (timm's rule, which a torchvision file gets too)."""
    from resnet_jax.torchvision import adapt_input_conv

    params = variables.get("params", {})
    for name in ("conv1", "conv1_0"):
        kernel = params.get(name, {}).get("kernel")
        if kernel is not None and np.ndim(kernel) == 4 and np.shape(kernel)[2] == 3 and in_channels != 3:
            oihw = adapt_input_conv(np.transpose(np.asarray(kernel), (3, 2, 0, 1)), in_channels)
            params[name] = {**params[name], "kernel": np.transpose(oihw, (2, 3, 1, 0))}
            return True
    return False


def _published_variables(config, model, name: str) -> dict[str, Any]:
    """Published weights (downloaded once and cached, or ``config.weights_file``), converted with their own
    head: ``merge_pretrained`` keeps the fresh one instead where the run has another number of classes (no second
    initialisation of the whole model inside the converter)."""
    from resnet_jax.pretrained import pretrained

    overrides = {k: v for k, v in dict(config.model_overrides).items() if k != "num_classes"}
    _, variables = pretrained(name, file=config.get("weights_file") or None, progress=False, **overrides)
    return variables


def _torchvision_variables(config, model, source: Path) -> dict[str, Any]:
    """Convert a torchvision file for this model (its overrides included); a head for another number of
    classes, or none (a backbone saved without ``fc``, which torch loads with ``strict=False``), is initialised
    afresh."""
    from resnet_jax.torch_file import load_state_dict
    from resnet_jax.torchvision import load_torchvision, strip_wrapper_prefix

    # by its first bytes; a DataParallel/compiled model's prefix off first, or its head is not found as one
    state = strip_wrapper_prefix(load_state_dict(source))
    head = state.get(f"{HEAD}.weight")
    new_head = head is None or np.shape(head)[0] != model.num_classes
    overrides = {**dict(config.model_overrides), "num_classes": model.num_classes}
    _, variables = load_torchvision(config.model, state, new_head=new_head, rng=config.seed, **overrides)
    return variables


def merge_pretrained(fresh: dict[str, Any], loaded: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Take ``loaded`` values into the structure of ``fresh``; only the head may differ in shape."""
    out, replaced, problems = {}, [], []
    for collection in fresh:
        target = flatten_dict(fresh[collection], sep="/")
        source = flatten_dict(loaded.get(collection, {}), sep="/")
        merged = {}
        for key, value in target.items():
            got = source.get(key)
            if got is not None and tuple(np.shape(got)) == tuple(value.shape):
                merged[key] = np.asarray(got, value.dtype)
            elif key.split("/")[0] == HEAD:
                merged[key] = value
                replaced.append(f"{collection}/{key}")
            elif got is None:
                problems.append(f"missing {collection}/{key}")
            else:
                problems.append(f"{collection}/{key}: source {tuple(np.shape(got))}, model {tuple(value.shape)}")
        extra = sorted(set(source) - set(target))
        problems += [f"unexpected {collection}/{k}" for k in extra if k.split("/")[0] != HEAD]
        out[collection] = unflatten_dict(merged, sep="/")
    if problems:
        raise ValueError("the starting weights do not fit the model: " + "; ".join(problems[:20]) +
                         (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))
    return out, replaced
