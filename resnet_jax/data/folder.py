"""A directory of class folders (torchvision's ``ImageFolder`` layout) as a source, so a user's own photos train
without a preparing step and get the class indices torchvision would give the same folders.

    photos/train/cat/001.jpg          get_source("folder:photos", "train")
    photos/val/dog/x.png              get_source("folder:photos", "val")  (a split is a subfolder of the root)

As torchvision's ``ImageFolder``: the classes are the sorted subfolder names, images are found recursively
under each class (links followed), by file extension (case-insensitive), in sorted order, and read with Pillow
and converted to RGB. Two differences: names starting with "." are skipped, so ``.ipynb_checkpoints`` is not a
class and macOS's ``._photo.jpg`` resource forks are not images; and 16-bit greyscale keeps its top 8 bits (as
torchvision's ``decode_image`` reads it) where ``ImageFolder``'s Pillow conversion clips it to white. A split
can take a percentage slice of every class (``"train[:90%]"``, ``"train[90%:]"``, rounded to the nearest image as
TFDS's slices are): one folder then gives a training and a validation split with the classes in the same
proportions and no image in both.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from resnet_jax.data.source import Source

PREFIX = "folder:"
# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT = re.compile(r"(?P<folder>[^\[\]]+?)(?:\[(?P<start>\d+%)?:(?P<stop>\d+%)?\])?")


class FolderSource(Source):
    """``root/<split>/<class>/**/<image>``: every image file under each class folder, labelled by the class's
    index among the sorted class folders."""

    labels_by_name = True  # a label is an index into this folder's class list, not a fixed meaning

    def __init__(self, root, split: str):
        root = os.path.expanduser(os.fspath(root))
        # a folder that exists is taken as named ("train [2024]"), before its name is read as a slice
        folder, start, stop = ((split, 0, 100) if isinstance(split, str) and split and
                               os.path.isdir(os.path.join(root, split)) else _parse_split(split))
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist; point 'folder:PATH' at the directory holding "
                             f"one subfolder per split (e.g. train/, val/), each with one subfolder per class.")
        split_dir = os.path.join(root, folder)
        if not os.path.isdir(split_dir):
            present = ", ".join(_visible_dirs(root)) or "none"
            raise ValueError(f"image folder {root!r} has no split folder {folder!r} (its folders: {present}); name "
                             f"one of them as the split (config.train_split / config.val_split) or slice one, "
                             f"e.g. 'train[:90%]' and 'train[90%:]'.")
        classes = _visible_dirs(split_dir)
        if not classes:
            raise ValueError(f"{split_dir!r} holds no class folders; put each class's images in a subfolder named "
                             f"after it ({split_dir}/<class>/<image>).")
        paths, labels = [], []
        self.skipped_files = {}  # class -> a few of the files in its folder that are not images by extension
        for label, name in enumerate(classes):
            files, skipped = _images_under(os.path.join(split_dir, name))
            if skipped:
                self.skipped_files[name] = skipped
            files = files[_share(len(files), start):_share(len(files), stop)]
            paths += files
            labels += [label] * len(files)
        self._root, self._paths, self._labels = split_dir, paths, np.asarray(labels, np.int64)
        # an empty class folder is kept (as ImageFolder(allow_empty=True)): a validation split may lack a class
        # that its training split has; training on a split without some class is refused (check_every_class)
        self.class_counts = np.bincount(self._labels, minlength=len(classes))
        self._fingerprint = None
        self.name, self.split = PREFIX + os.path.basename(os.path.normpath(root)), split
        self.num_classes, self.class_names = len(classes), classes
        self.image_shape = (None, None, 3)

    def fingerprint(self) -> dict:
        """The class names, files (relative to the split's folder) and labels, hashed, with the file count: equal
        for the same images wherever the folder now is, different after any image is added, removed or renamed."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> dict:
        digest = hashlib.sha256("\0".join(self.class_names).encode())
        for path, label in zip(self._paths, self._labels.tolist()):
            digest.update(f"\n{label}\0{path}".encode())
        return {"files": len(self._paths), "sha256": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        from resnet_jax.data.images import pil_pixels

        path = os.path.join(self._root, self._paths[index])
        try:
            with Image.open(path) as img:
                image = np.asarray(pil_pixels(img, "RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path!r} ({err}); replace it with a readable image of the same name "
                             f"(a run then resumes with the same command; removing the file changes the folder's "
                             f"list of files, which a resumed run refuses)") from None
        return {"image": image, "label": int(self._labels[index])}


def is_slice(root: str, split: str) -> bool:
    """Whether ``split`` names a percentage slice of a split folder of ``root``, as ``FolderSource`` reads it (an
    existing folder is taken by name, brackets and all)."""
    if os.path.isdir(os.path.join(os.path.expanduser(root), split)):
        return False
    match = _SPLIT.fullmatch(split)
    return bool(match and (match["start"] or match["stop"]))


def _share(count: int, percent: int) -> int:
    """The image index at ``percent`` of a class of ``count`` images, rounded to the nearest as TFDS's default
    "closest" slices are: rounded down, ``train[:90%]`` took no image of a one-image class (all went to
    ``train[90%:]``) and one of every class under ten."""
    return int(round(percent * count / 100.0))


def _parse_split(split: str) -> tuple[str, int, int]:
    """("train", 0, 90) from "train[:90%]"; only whole-percent slices, as they keep every class's share."""
    match = _SPLIT.fullmatch(split) if isinstance(split, str) else None
    start = int(match["start"][:-1]) if match and match["start"] else 0
    stop = int(match["stop"][:-1]) if match and match["stop"] else 100
    if not match or not 0 <= start <= stop <= 100:
        raise ValueError(f"split {split!r} is not a folder name with an optional percentage slice of each class "
                         f"('train', 'train[:90%]', 'train[90%:]', 'train[10%:20%]').")
    return match["folder"], start, stop


def _visible_dirs(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images_under(class_dir: str) -> tuple[list[str], list[str]]:
    """Image files below ``class_dir`` as paths relative to its parent, in torchvision's order (the walk sorted
    by directory, each directory's files sorted), and the names of up to three visible files skipped for their
    extension (a folder of .gif or .heic files, which ImageFolder skips too: said when a class ends up empty)."""
    parent = os.path.dirname(class_dir)
    walked = []
    for directory, subdirs, files in os.walk(class_dir, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        walked.append((directory, files))
    images, skipped = [], []
    for directory, files in sorted(walked):
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                images.append(os.path.relpath(os.path.join(directory, f), parent))
            elif not f.startswith(".") and len(skipped) < 3:
                skipped.append(f)
    return images, skipped
