"""ResNet-50 on ImageNet with torchvision's V2 recipe (``ResNet50_Weights.IMAGENET1K_V2``, 80.858% top-1).

Source: the ResNet-50 command in torchvision's ``references/classification/README.md``:

    torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5 \\
    --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear \\
    --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002 \\
    --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 \\
    --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4

and ``references/classification/train.py``'s defaults for what it leaves out. Where this project does a step
differently, the line says so:
- the warm-up starts at 0, torchvision's at 0.01 x lr (``--lr-warmup-decay 0.01``);
- the cosine decays per step, torchvision's per epoch;
- "no decay on norms" also exempts the classifier's bias here (torchvision decays it: no ``--bias-weight-decay``);
- BatchNorm normalises over the whole global batch (torchvision: per GPU, 128 images).
ImageNet needs a manual download; see README, "CIFAR-10 and ImageNet".
"""

from resnet_jax.training import base_config


def get_config():
    c = base_config()
    c.model = "resnet50"                    # --model resnet50
    c.dataset = "imagenet2012"
    c.normalize = "imagenet"                # train.py: Normalize(IMAGENET mean/std)
    c.image_size = 176                      # --train-crop-size 176
    # --val-resize-size 232, --val-crop-size 224 (train.py default). torchvision's flags stay put when the
    # train crop changes; here they keep their ratio to image_size (232/224 at 176, the recipe's; a 24 px run
    # evaluated at 224 scored chance). Set eval_resize / eval_crop to fix them instead.
    c.eval_crop = (c.get_ref("image_size") * 224 + 88) // 176
    c.eval_resize = (c.get_ref("image_size") * 232 + 88) // 176
    c.eval_interpolation = "bilinear"       # --interpolation bilinear (train.py default)
    c.augment = "imagenet"                  # RandomResizedCrop(176) + RandomHorizontalFlip (presets.py)
    c.auto_augment = "ta_wide"              # --auto-augment ta_wide
    c.random_erasing = 0.1                  # --random-erase 0.1
    c.ra_reps = 4                           # --ra-sampler --ra-reps 4
    c.batch_size = 1024                     # --nproc_per_node=8 x --batch-size 128
    c.num_epochs = 600                      # --epochs 600
    c.optimizer = "sgd"                     # train.py default --opt sgd
    c.momentum = 0.9                        # train.py default --momentum 0.9
    c.learning_rate = 0.5                   # --lr 0.5, for the global batch of 1024
    c.lr_scaling = "none"
    c.schedule = "cosine"                   # --lr-scheduler cosineannealinglr (to 0: --lr-min default 0)
    c.warmup_epochs = 5                     # --lr-warmup-epochs 5 --lr-warmup-method linear
    c.weight_decay = 2e-5                   # --weight-decay 0.00002
    c.decay_norm_and_bias = False           # --norm-weight-decay 0.0
    c.label_smoothing = 0.1                 # --label-smoothing 0.1
    c.mixup_alpha = 0.2                     # --mixup-alpha 0.2
    c.cutmix_alpha = 1.0                    # --cutmix-alpha 1.0
    c.model_ema = True                      # --model-ema
    c.model_ema_steps = 32                  # train.py default --model-ema-steps 32
    c.model_ema_decay = 0.99998             # train.py default --model-ema-decay 0.99998
    c.num_workers = 16
    c.eval_batch_size = 500
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    return c
