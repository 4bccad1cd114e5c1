"""Per-channel mean and std (0..1 units) used to normalise each dataset; names match `get_source` names.

ImageNet's values are also what every torchvision checkpoint was trained with, so fine-tuning from those
weights must use IMAGENET_MEAN / IMAGENET_STD whatever the target dataset.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenette": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet_resized": (IMAGENET_MEAN, IMAGENET_STD),
    # Per-pixel statistics of the training sets (the often-quoted CIFAR std 0.2023 is a miscomputed value).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    # The bundled scikit-learn digits, training split upsampled bilinearly to 32x32.
    "digits": ((0.3057,), (0.3235,)),
    # Uniform random bytes: mean 127.5/255, std sqrt((256**2 - 1) / 12) / 255.
    "synthetic": ((0.5,), (0.2898,)),
}


def known_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``DATASET_STATS`` of a dataset by its base name, whatever spelling picks it: ``tfds:cifar10``,
    ``cifar10:3.0.2`` (a pinned version), ``imagenette/320px`` (a config) all have their dataset's statistics;
    None where the dataset has none listed."""
    return DATASET_STATS.get(dataset.removeprefix("tfds:").split("/")[0].split(":")[0])
