"""The extension's calls follow the batch sharding: a data-parallel step computes each device's shard where it
lies, with no all-gather of activations, and equals the one-device step.

The project's own jitted train and eval steps (``make_train_step`` / ``make_eval_step``, ResNet-8 under
``conv_impl="auto"``, and in CI's long step a one-block ResNet-18, whose stem max-pool's gradient runs in the
extension too) on a 1-device and a 2-device CPU mesh, in a child process (the device count is fixed before
jax starts)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import require_onednn

PROBE = textwrap.dedent(r"""
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from resnet_jax.parallel import make_mesh, replicate, shard_batch
    from resnet_jax.training import base_config
    from resnet_jax.training.config import model_from_config
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state
    from resnet_jax.training.steps import make_eval_step, make_train_step

    c = base_config()
    c.model, c.batch_size, c.image_size, c.augment, c.learning_rate = sys.argv[2], 8, 16, "none", 0.1
    c.model_overrides.update(in_channels=3, stage_sizes=tuple(json.loads(sys.argv[3])), conv_impl=sys.argv[1],
                             **json.loads(sys.argv[4]))
    model = model_from_config(c, 10)
    tx = make_optimizer(c, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32), "mask": np.ones(8, bool)}

    def gathers(text):
        return text.count("all-gather(") + text.count("all-gather-start(")

    def image_batches(text):  # the batch axis of every image an extension call returns
        return sorted({int(m) for m in re.findall(
            r"= f32\[(\d+),\d+,\d+,\d+\][^\n]*custom_call_target=\"ResnetJax(?:ConvForward|ConvBackwardData|"
            r"WinogradForward|BatchNormApply|BatchNormGradApply|MaxPoolGrad)\"", text)})

    out = {}
    for n in (1, 2):
        mesh = make_mesh(jax.devices()[:n])
        state = replicate(create_train_state(model, tx, 0, (1, 16, 16, 3)), mesh)
        data = shard_batch(batch, mesh)
        train, evaluate = make_train_step(c, 10, mesh), make_eval_step(mesh, model)
        texts = [train.lower(state, data).compile().as_text(), evaluate.lower(state, data).compile().as_text()]
        eval_loss = float(jax.device_get(evaluate(state, data))["loss"])
        losses = []
        for _ in range(2):
            state, sums = train(state, data)
            losses.append(float(jax.device_get(sums)["loss"]))
        out[n] = {"all_gather": sum(map(gathers, texts)), "losses": [*losses, eval_loss],
                  "calls": sum(t.count('custom_call_target="ResnetJax') for t in texts),
                  "summed": sum(t.count('custom_call_target="ResnetJaxMatmulAccumulate"') for t in texts),
                  "batch_norm_calls": sum(t.count('custom_call_target="ResnetJaxBatchNorm') for t in texts),
                  "batches": sorted({b for t in texts for b in image_batches(t)})}
    # a positive control for the count: a batch that must be whole on every device is gathered
    whole = NamedSharding(mesh, PartitionSpec())
    control = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, whole) + 1).lower(data["image"])
    out["control_all_gather"] = gathers(control.compile().as_text())
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("model, stages, conv_impl, overrides", [
    ("resnet20", [1, 1, 1], "auto", {}),
    pytest.param("resnet18", [1, 1, 1, 1], "auto", {}, marks=pytest.mark.long),
    # bottleneck blocks: their first input gradient sums the shortcut's inside oneDNN's GEMM (ops/fanout.py)
    pytest.param("resnet50", [2, 1, 1, 1], "auto", {}, marks=pytest.mark.long),
    # dilated stages through sub-grids: the batch of sub-grids (8 images x 2 x 2 per device) stays split too
    pytest.param("resnet18", [1, 1, 1, 1], "onednn_winograd_f4@atrous", {"output_stride": 8},
                 marks=pytest.mark.long)])
def test_data_parallel_steps_run_the_extension_per_shard_without_all_gathers(model, stages, conv_impl, overrides):
    require_onednn()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", PROBE, conv_impl, model, json.dumps(stages), json.dumps(overrides)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")))
    one, two = result["1"], result["2"]
    assert result["control_all_gather"] > 0  # the count sees a gathered batch
    assert one["calls"] > 0 and two["calls"] == one["calls"]  # both steps run the extension ...
    assert one["batch_norm_calls"] > 0 and two["batch_norm_calls"] == one["batch_norm_calls"]  # BatchNorm too
    assert two["all_gather"] == 0, two  # ... and never gather the batch for it
    assert two["summed"] == one["summed"] == (5 if model == "resnet50" else 0)  # every block (ops/fanout.py)
    # each device computes its half of the batch; dilated layers on their sub-grids, 2 x 2 and 4 x 4 per image
    assert one["batches"] == ([8, 8 * 2 * 2, 8 * 4 * 4] if overrides else [8])
    assert two["batches"] == [b // 2 for b in one["batches"]]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
