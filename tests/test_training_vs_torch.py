"""The project's training step (``make_train_step`` with ``make_optimizer``) against PyTorch as an outside reference.

ResNet-18 (batch 8, 64x64, 10 classes) starts from the same weights on both sides (exported with
``to_torchvision``, loaded strictly into torchvision's ``resnet18``) and takes two steps: the project's jitted
step built from a config, and torchvision's model in train mode with ``torch.optim.SGD`` / ``torch.optim.AdamW``.
Each step is compared in its three parts:

* the forward pass: the loss the step reports (steps 1 and 2) and every BatchNorm running mean and variance
  after step 1;
* the optimizer: torch's optimizer is handed the *project's* gradient (as ``p.grad``) and must reproduce the
  project's parameters after each step, every element. The project's optimizer is ``make_optimizer(config)``
  unchanged, chained behind a pass-through transformation that keeps the gradient it receives in the optimizer
  state, where the test reads it after the step;
* the gradient (its own test): the project's (jax.grad through its own BatchNorm and convolution backward
  passes) against torch autograd's, at the same parameters and batch.

Why the optimizer gets the project's gradient rather than torch's own: two float32 gradients of ResNet-18
disagree far beyond rounding now and then. The gradient is discontinuous at every ReLU and max-pool tie, a batch
of 8 at 64x64 has some ten activations within 1e-5 (of their layer's spread) of such a kink, and rounding, which
differs between the two sides, can put one on the other side: that changes one channel's gradient by ~10% and
every layer before it by ~1% (torch float32 against torch float64 does the same). And AdamW's first step
``g / (|g| + 1e-8)`` turns the float32 noise of a near-zero gradient into an arbitrary step of up to ``lr``, after
which the two trajectories differ by ~1e-4. Given the same gradient, both optimizers are plain arithmetic and
agree to rounding on every element, whatever the data, so the optimizer conventions are tested strictly and the
gradient test is the only one a kink flip can fail (see ``DATA_SEED``).

Conventions mirrored on the torch side, as the project defines them (``training/optim.py``, ``ops/batchnorm.py``):

* the learning rate is ``config.learning_rate`` as given (``lr_scaling="none"``, constant schedule, no warm-up);
* weight decay skips every 1-D parameter (``decay_mask``: BatchNorm scale/bias, the head's bias): torch gets two
  parameter groups, the 1-D tensors with ``weight_decay=0``;
* SGD adds ``wd * w`` to the gradient before momentum, as torch's SGD does; AdamW decays by value
  (``w -= lr * wd * w``, torch's decoupled AdamW) with optax.adamw's defaults for betas and eps (read from its
  signature, since ``make_optimizer`` passes none), which torch is given explicitly;
* the reported loss is the mean cross-entropy, without a weight-decay term;
* BatchNorm: momentum 0.9 (torch's 0.1) and epsilon 1e-5, and the running variance averages in the *unbiased*
  batch variance (times n / (n - 1), n = batch * height * width at that layer: 32 / 31 in layer4) on both
  sides, where flax would average the biased one: compared as they are, so the 3% a flax convention would put
  on layer4's running variance shows.

Other choices: weight decay 0.05, so that with lr 0.002 it moves a weight by 1e-4 of itself per step and a wrong
mask or convention shows ten times above the tolerance (1e-4 would move it by 2e-7, invisibly); non-zero
BatchNorm scale/bias/statistics (``trained_like``), so that decaying BatchNorm parameters by mistake changes them.
Step 2 is what tests momentum, Adam's betas and bias correction: after one step SGD's momentum buffer is the
gradient whatever the momentum, and Adam's bias-corrected moments are ``g`` and ``g**2`` whatever the betas.
Later steps are not compared: they drift apart by chaos.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from training_helpers import trained_like

from resnet_jax.ops.onednn.library import available as onednn_available
from resnet_jax.parallel import make_mesh
from resnet_jax.torchvision import to_torchvision
from resnet_jax.training import base_config, create_train_state, make_optimizer, make_train_step, model_from_config
from resnet_jax.training.config import validate

NUM_CLASSES, BATCH, SIZE, LR, WEIGHT_DECAY = 10, 8, 64, 0.002, 0.05
# Batches where rounding flips no activation across a ReLU/max-pool kink in any of the four gradients compared
# (steps 1 and 2 after SGD and after AdamW), on the machine this was written on: 4 and 11 of the 16 seeds tried.
# On the others the gradients still agree to ~2e-5 of each tensor's largest except from one layer down, by 1e-3 to
# 2e-1; losses, statistics and optimizers agree on all of them. So a gradient mismatch that starts in one layer and
# covers the ones before it, with the other tests passing, is such a flip (another CPU, library version or
# convolution algorithm from ops.tuning rounds differently), not a bug: try another seed before looking further.
DATA_SEED = 4
# The project's side runs direct convolutions (oneDNN's, torch's own kernels; XLA's without the extension), not the
# Winograd F(4,3) that "auto" gives layers of 16 or more 4x4 tiles: its float32 rounding (~1e-5 of a layer's
# scale, against lax at HIGHEST in tests/test_ops_conv.py) is ~100x a direct kernel's, and put a kink flip in
# 10 of the 11 seeds tried here. What this file checks is the step around the convolutions.
CONV_IMPL = "onednn" if onednn_available() else "xla"
LOSS_RTOL = (1e-6, 1e-5)  # step 1, step 2
STATE_RTOL = 1e-5  # parameters, BatchNorm statistics: max |project - torch| / max |torch| per tensor
GRAD_RTOL = 1e-4  # gradients, the same way: float32 noise through 20 layers reaches ~2e-5 of a tensor's largest
CPU = jax.devices("cpu")[0]  # where the project's own kernels run; a GPU's TF32 convolutions would not be float32


def adamw_defaults():
    """optax.adamw's betas and eps, which make_optimizer leaves at their defaults."""
    defaults = {k: v.default for k, v in inspect.signature(optax.adamw).parameters.items()}
    assert defaults["eps_root"] == 0.0 and defaults["nesterov"] is False  # torch.optim.AdamW has neither
    return (defaults["b1"], defaults["b2"]), defaults["eps"]


def config(optimizer):
    c = base_config()
    c.update(model="resnet18", optimizer=optimizer, batch_size=BATCH, image_size=SIZE, learning_rate=LR,
             lr_scaling="none", schedule="constant", warmup_epochs=0.0, momentum=0.9, nesterov=False,
             weight_decay=WEIGHT_DECAY, decay_norm_and_bias=False, label_smoothing=0.0, mixup_alpha=0.0,
             cutmix_alpha=0.0, class_weights=(), augment="none", dtype="float32", progress_bar=False,
             model_overrides={"conv_impl": CONV_IMPL})
    return validate(c)


def batches():
    rng = np.random.default_rng(DATA_SEED)
    return [{"image": rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32),
             "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)} for _ in range(2)]


def torch_optimizer(name, model, c):
    """The project's optimizer in torch terms: its decay mask (``ndim > 1``) as two parameter groups."""
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": c.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=c.learning_rate, momentum=c.momentum, dampening=0.0, nesterov=c.nesterov)
    betas, eps = adamw_defaults()
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=betas, eps=eps, amsgrad=False)


def keeping_gradients(tx):
    """``tx`` unchanged, with the gradient it was given kept in its state (the project's step returns only the
    new state and the metric sums)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params), tx.init(params)

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state[1], params)
        return updates, (grads, inner)

    return optax.GradientTransformation(init, update)


def run_project(c, variables, data):
    """Two steps of the project's jitted step. Per step: the loss, the variables after it and the gradient it
    used (torch names and layouts)."""
    model = model_from_config(c, NUM_CLASSES)
    tx = keeping_gradients(make_optimizer(c, steps_per_epoch=1))
    with jax.default_device(CPU):
        state = create_train_state(model, tx, c.seed, (1, SIZE, SIZE, 3), variables)
    step = make_train_step(c, NUM_CLASSES, make_mesh([CPU]))
    losses, after, grads = [], [], []
    for batch in data:
        state, sums = step(state, batch)
        sums = jax.device_get(sums)
        assert float(sums["count"]) == BATCH
        losses.append(float(sums["loss"]) / float(sums["count"]))
        after.append(to_torchvision(state.variables))  # numpy copies: the next step donates the state
        grads.append(to_torchvision({"params": state.opt_state[0], "batch_stats": state.batch_stats}))
    return losses, after, grads


def run_torch(name, c, initial, data, project_grads):
    """Two steps in torch: forward and backward by torch, the update by torch's optimizer from the project's
    gradient. Per step: the loss, the state_dict after the step and torch's own gradient."""
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in initial.items()}, strict=True)
    model.train()
    opt = torch_optimizer(name, model, c)
    losses, after, grads = [], [], []
    for batch, project_grad in zip(data, project_grads):
        images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
        labels = torch.from_numpy(batch["label"].astype(np.int64))
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.numpy().copy() for n, p in model.named_parameters()})
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.grad.copy_(torch.from_numpy(np.array(project_grad[n])))
        opt.step()
        after.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    return losses, after, grads


def relative_difference(a, b):
    """max |a - b| relative to the largest |b| of the tensor."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff.max()) / max(float(np.abs(b).max()), 1e-30)


def over(diffs, tolerance):
    return {n: f"{v:.1e}" for n, v in diffs.items() if v > tolerance}


def worst(diffs):
    name = max(diffs, key=diffs.get)
    return f"{name} {diffs[name]:.1e}"


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def start():
    """The shared starting point, as host numpy arrays (the step donates its state) and in torch names."""
    model = model_from_config(config("sgd"), NUM_CLASSES)
    with jax.default_device(CPU):
        variables = model.init(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32), train=False)
        variables = jax.tree.map(np.asarray, trained_like(variables))
    return variables, to_torchvision(variables)


@pytest.fixture(scope="module")
def runs(start):
    """``runs(name)``: both sides' two steps with that optimizer and their differences, computed once."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = compare(name, *start)
        return done[name]

    return get


def compare(name, variables, initial):
    c = config(name)
    data = batches()
    project_losses, project_after, project_grads = run_project(c, variables, data)
    torch_losses, torch_after, torch_grads = run_torch(name, c, initial, data, project_grads)

    params = list(torch_grads[0])
    stats = [n for n in torch_after[0] if n.endswith(("running_mean", "running_var"))]
    assert len(params) == 62 and len(stats) == 40 and set(project_after[0]) == set(torch_after[0])
    stat_rel = {}
    for n in stats:
        stat_rel[n] = relative_difference(project_after[0][n], torch_after[0][n].astype(np.float64))
    result = {
        "loss": [abs(p - t) / abs(t) for p, t in zip(project_losses, torch_losses)],
        "params": [{n: relative_difference(project_after[s][n], torch_after[s][n]) for n in params} for s in (0, 1)],
        "grads": [{n: relative_difference(project_grads[s][n], torch_grads[s][n]) for n in params} for s in (0, 1)],
        "stats": stat_rel,
    }
    result["report"] = (
        f"{name}: loss {project_losses[0]:.7f} vs torch {torch_losses[0]:.7f} (rel {result['loss'][0]:.1e}), step 2 "
        f"rel {result['loss'][1]:.1e}; worst parameter after step 1: {worst(result['params'][0])}, after step 2: "
        f"{worst(result['params'][1])}; worst BatchNorm statistic: {worst(stat_rel)}; worst gradient step 1: "
        f"{worst(result['grads'][0])}, step 2: {worst(result['grads'][1])}")
    print(result["report"])
    return result


def check_step(result):
    report = result["report"]
    assert result["loss"][0] <= LOSS_RTOL[0], report
    bad = over(result["stats"], STATE_RTOL)
    assert not bad, f"{report}\nBatchNorm statistics after step 1 differ: {bad}"
    for s in (0, 1):
        bad = over(result["params"][s], STATE_RTOL)
        assert not bad, f"{report}\nthe same gradient, different parameters after step {s + 1}: {bad}"
    assert result["loss"][1] <= LOSS_RTOL[1], report


def test_sgd_momentum_steps_match_torch_sgd(runs):
    """SGD, momentum 0.9, weight decay 0.05 added to the gradient of kernels only, constant lr 0.002."""
    check_step(runs("sgd"))


def test_adamw_steps_match_torch_adamw(runs):
    """AdamW (optax's betas and eps), decoupled weight decay 0.05 on kernels only, constant lr 0.002."""
    check_step(runs("adamw"))


def test_gradients_match_torch_autograd(runs):
    """The gradient of the project's step (through its own BatchNorm and convolution backward passes) against
    torch autograd's, at the same parameters and batch: step 1, where both sides hold bitwise the same weights.
    Not step 2: there the two sides' parameters already differ by ~1e-7, and a change of the backward pass's
    rounding moved one activation across a ReLU kink (AdamW, layer3); steps 1-2 of the optimizers are checked
    above. Still the one check a kink flip can fail (module docstring, ``DATA_SEED``)."""
    result = runs("sgd")
    bad = over(result["grads"][0], GRAD_RTOL)
    assert not bad, (f"{result['report']}\ngradients of step 1 differ (a kink flip if this starts in one layer "
                     f"and covers the ones before it; see DATA_SEED): {bad}")
