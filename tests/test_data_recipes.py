"""The V2/RSB recipe parts of the training loader: repeated augmentation against the sampler torchvision's and
timm's recipes use (timm's ``RepeatAugSampler``, the DeiT ``RASampler`` that torchvision's references copy), and
TrivialAugmentWide/RandAugment and random erasing inside the Grain pipeline."""

import numpy as np
import pytest
from timm.data.distributed_sampler import RepeatAugSampler

from resnet_jax import data
from resnet_jax.data import augment, autoaugment
from resnet_jax.data.source import Source


class Indexed(Source):
    """Record i is a 6x5 image of value i % 256 whose label is i, so a batch says which records it holds."""

    def __init__(self, n):
        self.n, self.name, self.split = n, "indexed", "train"
        self.num_classes, self.class_names, self.image_shape = n, [str(i) for i in range(n)], (6, 5, 3)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((6, 5, 3), i % 256, np.uint8), "label": i}


def labels_of(loader, batches):
    iterator = iter(loader)
    return [next(iterator)["label"].tolist() for _ in range(batches)]


def as_first_seen(batches):
    """Each index replaced by the order in which its record first appears in the epoch: the layout of repeats
    and batches, whatever random permutation the epoch used."""
    order = {}
    for batch in batches:
        for i in batch:
            order.setdefault(i, len(order))
    return [sorted(order[i] for i in batch) for batch in batches]


def timm_global_batches(n, reps, replicas, local_batch, epoch):
    """timm's sampler on ``replicas`` ranks (no 256-rounding), each rank's epoch cut into local batches; global
    batch k = every rank's k-th local batch, as data-parallel training takes them."""
    ranks = []
    for rank in range(replicas):
        sampler = RepeatAugSampler(range(n), num_replicas=replicas, rank=rank, num_repeats=reps, selected_round=0)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    steps = len(ranks[0]) // local_batch
    return [sum((r[k * local_batch:(k + 1) * local_batch] for r in ranks), []) for k in range(steps)]


@pytest.mark.parametrize("reps,replicas,local_batch", [(4, 8, 2), (3, 2, 6), (2, 4, 3)])
def test_repeated_augmentation_batches_hold_what_the_reference_samplers_batches_hold(reps, replicas, local_batch):
    """Per epoch and global batch: which records (by their order in the epoch) and how often, equal to timm's
    RepeatAugSampler over ``replicas`` ranks; the epoch keeps its length, so its first n / reps records are
    seen reps times each and the rest not at all."""
    n, global_batch = 96, replicas * local_batch
    loader = data.train_loader(Indexed(n), batch_size=global_batch, image_size=5, mean=0.0, std=1.0, seed=3,
                               ra_reps=reps)
    steps = n // global_batch
    ours = labels_of(loader, 2 * steps)
    for epoch in range(2):
        mine = ours[epoch * steps:(epoch + 1) * steps]
        theirs = timm_global_batches(n, reps, replicas, local_batch, epoch)
        assert as_first_seen(mine) == as_first_seen(theirs)
        counts = np.bincount(sum(mine, []), minlength=n)
        assert sorted(set(counts.tolist())) == [0, reps] and (counts == reps).sum() == n // reps
    assert sorted(sum(ours[:steps], [])) != sorted(sum(ours[steps:], []))  # each epoch shuffled anew


def test_repeated_copies_are_augmented_independently_and_split_over_processes_as_one_process_loads_them():
    src = data.get_source("synthetic", "train", image_size=24, num_examples=64)
    kwargs = dict(batch_size=16, image_size=16, augment="imagenet", seed=0, ra_reps=4)
    batch = next(iter(data.train_loader(src, **kwargs)))
    labels, images = batch["label"], batch["image"]
    assert all(len(set(labels[i:i + 4].tolist())) == 1 for i in range(0, 16, 4))
    for i in range(0, 16, 4):  # four copies of one record, four different crops
        assert len({images[j].tobytes() for j in range(i, i + 4)}) == 4
    halves = [next(iter(data.train_loader(src, process_index=p, process_count=2, **kwargs))) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), images)


def test_random_erasing_blanks_one_rectangle_to_the_mean_after_normalising_and_leaves_the_rest():
    src = data.get_source("synthetic", "train", image_size=24, num_examples=256)
    kwargs = dict(batch_size=256, image_size=24, augment="imagenet", seed=1, mean=0.5, std=0.25)
    plain = next(iter(data.train_loader(src, **kwargs)))["image"]
    erased = next(iter(data.train_loader(src, random_erasing=0.5, **kwargs)))["image"]
    changed = plain != erased
    assert 0.35 < changed.any(axis=(1, 2, 3)).mean() < 0.65  # p = 0.5 (a few draws find no rectangle)
    assert (erased[changed] == 0.0).all()  # value 0 after Normalize: the mean colour
    for example in changed.any(-1):  # one axis-aligned rectangle, every channel
        rows, cols = np.nonzero(example)
        if rows.size:
            assert example[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_auto_augment_runs_torchvisions_policy_after_the_crop_in_the_loader():
    """The loader's images are the crops it makes without the policy, each put through one TrivialAugmentWide
    operation: checked by finding, for each, an operation and magnitude of the policy's space that gives it."""
    src = data.get_source("synthetic", "train", image_size=12, num_examples=16)
    kwargs = dict(batch_size=16, image_size=12, augment="none", seed=0, mean=0.0, std=1 / 255)
    plain = np.round(next(iter(data.train_loader(src, **kwargs)))["image"]).astype(np.uint8)
    augmented = np.round(next(iter(data.train_loader(src, auto_augment="ta_wide", **kwargs)))["image"])
    space = autoaugment.wide_space()
    for before, after in zip(plain, augmented):
        candidates = [(name, sign * m) for name, (bins, signed) in space.items() for m in bins
                      for sign in ((1, -1) if signed else (1,))]
        assert any(np.array_equal(augment.apply_op(before, name, float(m), interpolation="bilinear"), after)
                   for name, m in candidates)
    assert (plain != augmented).any()


def test_the_loader_resizes_its_random_resized_crops_with_the_interpolation_asked():
    """train_loader(train_interpolation=) reaches the crop (as config.train_interpolation, timm's
    --train-interpolation): bicubic crops differ from bilinear ones, and "random" mixes the two."""
    src = data.get_source("synthetic", "train", image_size=32, num_examples=16)
    kwargs = dict(batch_size=16, image_size=16, augment="imagenet", seed=0, mean=0.0, std=1 / 255)
    batches = {mode: np.round(next(iter(data.train_loader(src, train_interpolation=mode, **kwargs)))["image"])
               for mode in ("bilinear", "bicubic", "random")}
    same_as = [[any(np.array_equal(batches["random"][i], b) for b in (batches[m][i], batches[m][i][:, ::-1]))
                for m in ("bilinear", "bicubic")] for i in range(16)]  # the same box; the flip drawn after the pick
    assert all(sum(pair) == 1 for pair in same_as) and 0 < sum(b for _, b in same_as) < 16, same_as
    with pytest.raises(ValueError, match="train_interpolation must be one of"):
        data.train_loader(src, train_interpolation="lanczos", **kwargs)


@pytest.mark.parametrize("kwargs,message", [({"random_erasing": 1.5}, "probability in \\[0, 1\\]"),
                                            ({"ra_reps": 0}, "at least 1"),
                                            ({"ra_reps": 3}, "leaves 3 distinct examples per epoch of the 8, fewer "
                                                             "than one batch of 4"),
                                            ({"auto_augment": "ta-wide"}, "not one of")])
def test_bad_recipe_settings_are_one_sentence(kwargs, message):
    src = data.get_source("synthetic", "train", image_size=8, num_examples=8)
    with pytest.raises(ValueError, match=message):
        data.train_loader(src, batch_size=4, image_size=8, **kwargs)
