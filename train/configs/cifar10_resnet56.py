"""He et al. 2015, CIFAR-10 ResNet-56: batch 128, lr 0.1, momentum 0.9, wd 1e-4, /10 at 50% and 75% of
training (the paper's 32k/48k of 64k iterations, here 82/123 of 164 epochs). Expect about 93% test accuracy.

Prepare the data once: ``python -m resnet_jax.data.prepare cifar10`` (see README)."""

from resnet_jax.training import base_config


def get_config():
    c = base_config()
    c.model = "resnet56"
    c.dataset = "cifar10"
    c.train_split = "train"
    c.val_split = "test"
    c.image_size = 32
    c.augment = "cifar"
    c.batch_size = 128
    c.num_epochs = 164
    c.learning_rate = 0.2          # per 256 images: 0.1 at batch 128
    c.schedule = "multistep"
    c.milestones = (82, 123)
    c.weight_decay = 1e-4
    c.decay_norm_and_bias = True   # the reference decays every parameter (torch.optim.SGD(model.parameters(), ...))
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    return c
