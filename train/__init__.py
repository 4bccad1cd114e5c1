"""Command-line entry points: ``python -m train`` (train), ``train.evaluate``, ``train.predict``, ``train.export``."""
