"""The EMA of the weights against torch's ``AveragedModel`` with torchvision's recipe's average (``use_buffers``:
BatchNorm statistics averaged too) and its count reset, over a run of changing weights; torchvision's decay
adjustment at the V2 recipe's numbers."""

import jax
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from resnet_jax.training.ema import Ema, adjusted_decay


def torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def floats(model):
    """Every float parameter and buffer by name (num_batches_tracked is an integer count, not averaged here)."""
    state = model.state_dict()
    return {k: v.detach().numpy().copy() for k, v in state.items() if v.is_floating_point()}


def test_matches_torch_averaged_model_with_torchvisions_average():
    decay = 0.9
    model = torch_model()
    model(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer
    # torchvision's references/classification ExponentialMovingAverage: this average, buffers included
    reference = AveragedModel(model, avg_fn=lambda avg, new, n: decay * avg + (1 - decay) * new, use_buffers=True)
    ema = Ema.create(floats(model))
    update = jax.jit(lambda e, v: e.update(v, decay))
    rng = np.random.default_rng(0)
    for step in range(12):
        with torch.no_grad():  # stand-in for a training step: every weight and statistic moves
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.from_numpy(rng.standard_normal(tuple(tensor.shape)).astype(np.float32)))
        if step == 5:  # a warm-up epoch boundary: torchvision zeroes n_averaged
            reference.n_averaged.fill_(0)
            ema = ema.reset()
        reference.update_parameters(model)
        ema = update(ema, floats(model))
    expected = {k[len("module."):]: v for k, v in floats(reference).items()}
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(ema.variables[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(ema.count) == int(reference.n_averaged) == 7  # updates since the reset


def test_torchvision_decay_adjustment_at_the_v2_recipe():
    # train.py: adjust = world_size * batch_size * model_ema_steps / epochs; alpha = min(1, (1 - decay) * adjust)
    # with the V2 command's 8 x 128 images, --model-ema-steps 32, --epochs 600, --model-ema-decay 0.99998
    assert adjusted_decay(0.99998, global_batch=8 * 128, update_every=32, epochs=600) == pytest.approx(
        1 - 2e-5 * 1024 * 32 / 600, abs=1e-12)
    assert adjusted_decay(0.5, global_batch=1024, update_every=32, epochs=1) == 0.0  # capped: a plain copy


@pytest.mark.parametrize("kwargs,message", [({"decay": 1.5}, "in \\[0, 1\\]"), ({"epochs": 0}, "positive")])
def test_bad_settings_are_one_sentence(kwargs, message):
    settings = {"decay": 0.999, "global_batch": 256, "update_every": 32, "epochs": 90, **kwargs}
    with pytest.raises(ValueError, match=message):
        adjusted_decay(settings.pop("decay"), **settings)
