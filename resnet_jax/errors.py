"""The errors of fetching weights, raised by both places weights come from (``pretrained``: torchvision's server
or a mirror; ``hub``: the Hugging Face hub), in a module of their own so that neither imports the other."""


class DownloadError(ConnectionError):
    """A weights file could not be fetched (no network, server error, interrupted transfer)."""
