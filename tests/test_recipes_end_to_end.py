"""The torchvision V2 and RSB A1 recipes (train/configs/imagenet_resnet50_{tv2,rsb_a1}.py) run end to end on
synthetic data, shrunk (a ResNet-50-shaped model one block deep and 8-16 channels wide, 32x32 images, two epochs of
four steps) but with every recipe part on: TrivialAugmentWide or timm's RandAugment, random erasing, repeated
augmentation, mixup/cutmix, SGD or LAMB, cross-entropy or BCE, the EMA evaluated as "val_ema" and loaded with
``use_ema`` (Classifier.load, train.evaluate), and gradient accumulation."""

import importlib
import json

import jax
import numpy as np
import pytest

from conftest import run_python
from resnet_jax.training import Classifier, train
from training_helpers import worker_env

pytestmark = pytest.mark.long  # two whole training runs with evaluation, and a CLI process


def shrunk(name, **overrides):
    c = importlib.import_module(f"train.configs.{name}").get_config()
    c.dataset, c.image_size, c.batch_size, c.eval_batch_size, c.num_epochs = "synthetic", 32, 256, 512, 2
    c.model_overrides.stage_sizes = (1, 1, 1, 1)
    c.model_overrides.stage_widths = (8, 8, 16, 16)
    c.model_overrides.stem_width = 8
    c.dtype, c.num_workers, c.warmup_epochs, c.progress_bar = "float32", 0, 1, False
    c.log_every_steps, c.checkpoint_every_steps = 2, 100
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def tv2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tv2")
    return workdir, train(shrunk("imagenet_resnet50_tv2", model_ema_steps=2), workdir)


def test_torchvision_v2_recipe_runs_and_evaluates_its_ema_beside_the_weights(tv2):
    workdir, result = tv2
    rows = result.history
    assert [r["epoch"] for r in rows if r["split"] == "val"] == [1, 2]
    ema_rows = [r for r in rows if r["split"] == "val_ema"]
    assert [r["epoch"] for r in ema_rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in ema_rows)
    state = result.state
    assert int(state.step) == 8 and int(state.ema.count) == 2  # epoch 2 (after warm-up): updates at i = 0, 2
    ema_params = jax.device_get(state.ema.variables["params"])
    assert not np.allclose(ema_params["fc"]["kernel"], jax.device_get(state.params)["fc"]["kernel"])

    averaged = Classifier.load(workdir, use_ema=True)
    jax.tree.map(np.testing.assert_array_equal, averaged.variables, jax.device_get(state.ema.variables))
    raw = Classifier.load(workdir)
    jax.tree.map(np.testing.assert_array_equal, raw.variables, jax.device_get(state.variables))
    assert averaged.evaluate(batch_size=512) == pytest.approx({k: ema_rows[-1][k] for k in ("loss", "accuracy",
                                                                                              "top5")}, rel=1e-5)
    out = run_python(module="train.evaluate", args=[f"--workdir={workdir}", "--use_ema", "--batch_size=512"],
                     env=worker_env())
    cli = json.loads(out.stdout.strip().splitlines()[-1])
    assert cli["accuracy"] == pytest.approx(ema_rows[-1]["accuracy"]) and cli["split"] == "validation"


def test_rsb_a1_recipe_runs_with_lamb_bce_randaugment_and_accumulation(tmp_path):
    result = train(shrunk("imagenet_resnet50_rsb_a1", grad_accum_steps=2), tmp_path / "rsb")
    assert result.config.optimizer == "lamb" and result.config.loss == "bce"
    assert result.config.auto_augment == "rand-m7-mstd0.5-inc1" and result.config.ra_reps == 3
    assert int(result.state.step) == 8 and result.state.ema is None
    assert [r["epoch"] for r in result.history if r["split"] == "val"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in result.history)
    with pytest.raises(ValueError, match="kept no moving average"):
        Classifier.load(tmp_path / "rsb", use_ema=True)
