"""The default run: He et al.'s ResNet-20 on the bundled 8x8 digits, about a minute on a 2-core CPU, ~99.4%
validation accuracy (360 images; 98.9-100% over seeds 0-7, with and without the oneDNN extension, 2026-12-06). Greyscale in, so the model takes one channel. The digits are upsampled to 16x16 (twice
their native size: larger only costs time, ResNet-20 at 32x32 is 4x the work for no accuracy)."""

from resnet_jax.training import base_config


def get_config():
    c = base_config()
    c.model = "resnet20"
    c.model_overrides.in_channels = 1
    c.dataset = "digits"
    c.image_size = 16
    c.augment = "crop"            # shifts only: a mirrored digit is another digit or none
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 50              # 30 left single seeds at 98.6% (5 of 360 wrong); 50: 98.9-100% over seeds 0-7
    c.learning_rate = 0.4          # per 256 images: 0.1 at batch 64
    c.schedule = "cosine"
    c.warmup_epochs = 1
    c.weight_decay = 1e-3          # 5e-4 reached 100% train accuracy and seed 0 ended at 98.6-98.9%
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    return c
