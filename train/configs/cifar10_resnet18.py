"""CIFAR-stem ResNet-18 on CIFAR-10 (the seed articles' recipe): SGD 0.1, momentum 0.9, wd 5e-4, cosine over
200 epochs, pad-4 crop + flip. Expect about 95% test accuracy."""

from resnet_jax.training import base_config


def get_config():
    c = base_config()
    c.model = "resnet18_cifar"
    c.dataset = "cifar10"
    c.val_split = "test"
    c.image_size = 32
    c.augment = "cifar"
    c.batch_size = 128
    c.num_epochs = 200
    c.learning_rate = 0.2          # per 256 images: 0.1 at batch 128
    c.schedule = "cosine"
    c.weight_decay = 5e-4
    c.decay_norm_and_bias = True   # the reference decays every parameter (torch.optim.SGD(model.parameters(), ...))
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    return c
