"""Fine-tune torchvision ResNet-18 weights on the bundled digits (a new 10-class head, ImageNet
normalisation, a small learning rate on a cosine schedule). Point ``--config.init_from`` at a torchvision ``.pth`` (or
``python -m train.export`` output, or another run's workdir)."""

from resnet_jax.training import base_config


def get_config():
    c = base_config()
    c.model = "resnet18"
    c.dataset = "digits"
    c.image_size = 64
    c.augment = "crop"              # shifts only: a mirrored digit is another digit or none (default.py)
    c.normalize = "imagenet"
    c.batch_size = 64
    c.num_epochs = 5
    c.optimizer = "sgd"
    c.learning_rate = 0.04          # per 256 images: 0.01 at batch 64
    c.schedule = "cosine"
    c.weight_decay = 1e-4
    c.init_from = ""                # e.g. "resnet18-f37072fd.pth"
    c.log_every_steps = 10
    return c
