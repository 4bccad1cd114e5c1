"""The one interface every dataset meets, so the pipeline never needs to know where images come from.

A source is random-access (`len`, `src[i]`): Grain can then shuffle, shard and resume by index alone, and a
resumed run reads exactly the records it would have read.
"""

from __future__ import annotations

from typing import Any


class Source:
    """A random-access image-classification dataset: `src[i] -> {"image": uint8 (H, W, C), "label": int}`.

    Attributes every source sets:
      name: a stable identifier (used in `repr`, which Grain compares when restoring iterator state).
      num_classes, class_names: from the dataset's metadata.
      image_shape: native (H, W, C) before augmentation; H and W are None for datasets of varying size.
    """

    name: str = "source"
    split: str = ""
    num_classes: int = 0
    class_names: list[str] = []
    image_shape: tuple[int | None, int | None, int] = (None, None, 3)
    # True where labels are positions in ``class_names`` as this source found them (class folders), so data with
    # other class names means other labels; False where the dataset fixes each label's meaning (TFDS, digits)
    labels_by_name: bool = False

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies the examples of a dataset whose contents can change (a user's folders): a resumed run
        compares it with the one its workdir recorded. ``None`` where the dataset is fixed (TFDS versions,
        digits)."""
        return None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        # Grain validates a restored iterator against repr(source): it must describe the data, not the object id.
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)})"
