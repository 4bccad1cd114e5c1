"""ResNet-50 on ImageNet, the seed recipe (He et al. 2015 / torchvision's reference): batch 256, SGD lr 0.1,
momentum 0.9, wd 1e-4, 90 epochs, x0.1 at epochs 30 and 60; random-resized crop 224 + flip; 76.1% top-1.

``--config=train/configs/imagenet_resnet50.py:cosine`` selects the modern variant: 5 warm-up epochs, cosine
decay, label smoothing 0.1, zero-init residuals, no weight decay on BatchNorm and biases (He et al. 2019, "Bag of
Tricks"), bf16 compute (about 77% top-1 in 90 epochs).
ImageNet needs a manual download; see README, "CIFAR-10 and ImageNet"."""

from resnet_jax.training import base_config


def get_config(variant: str = "step"):
    c = base_config()
    c.model = "resnet50"
    c.dataset = "imagenet2012"
    c.train_split = "train"
    c.val_split = "validation"
    c.image_size = 224
    # evaluation as torchvision's reference (--val-resize-size 256 --val-crop-size 224, its weights' transforms()):
    # the default box resize of crop_fraction 0.875 rounds otherwise and moves a third of a photo's values
    c.eval_crop = c.get_ref("image_size") * 1  # a reference of its own: setting eval_crop must not set image_size
    c.eval_resize = c.get_ref("image_size") * 256 // 224
    c.augment = "imagenet"
    c.normalize = "imagenet"
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 90
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.decay_norm_and_bias = True   # the reference decays every parameter (torch.optim.SGD(model.parameters(), ...))
    c.schedule = "multistep"
    c.milestones = (30, 60)
    c.num_workers = 16
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    if variant == "cosine":
        c.schedule = "cosine"
        c.warmup_epochs = 5
        c.label_smoothing = 0.1
        c.zero_init_residual = True
        c.dtype = "bfloat16"
        c.decay_norm_and_bias = False   # Bag of Tricks' "no bias decay", with its cosine and label smoothing
    elif variant != "step":
        raise ValueError(f"unknown variant {variant!r} of imagenet_resnet50; use 'step' or 'cosine'")
    return c
