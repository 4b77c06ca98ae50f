"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""


class TlEmbedError(Exception):
    """Base class for user-facing errors (bad input, missing file, mismatched store...)."""


class WeightsUnavailableError(TlEmbedError):
    """Pretrained weights are neither in the Keras cache nor downloadable."""


class StoreError(TlEmbedError):
    """The embedding store is missing, locked, corrupt or incompatible."""


class IndexDamagedError(TlEmbedError):
    """A search index cannot be read back whole; it must be rebuilt from its store."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"index {path} is damaged ({reason}); rebuild it with `tl-embed index STORE --out {path}`")
