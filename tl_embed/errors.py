"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (at most 200 characters), else its type's name.

    Third-party errors (SQLite, OpenVINO, converters) span many lines; a user error is one line.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


class TlEmbedError(Exception):
    """Base class for user-facing errors (bad input, missing file, mismatched store...)."""


class WeightsUnavailableError(TlEmbedError):
    """Pretrained weights are neither in the Keras cache nor downloadable."""


class StoreError(TlEmbedError):
    """The embedding store is missing, locked, corrupt or incompatible."""


class StoreDamagedError(StoreError):
    """A store whose files do not agree with its manifest (or cannot be read at all).

    ``repairable`` damage (a missing or unreadable shard) is mended by the next ``embed`` run, which
    forgets the affected rows and embeds those images again; anything else needs a new store.
    """

    def __init__(self, path, what: str, repairable: bool = False):
        self.repairable = repairable
        hint = ("run `tl-embed embed IMAGES --out {p}` again to re-embed the affected images" if repairable
                else "embed the images into a new --out (this folder is left as it is)")
        super().__init__(f"store {path} is damaged: {what}; {hint.format(p=path)}")


class StoreReadOnlyError(StoreError):
    """The store lies on read-only media or in a folder we may not write: it can be read, not changed."""


class IndexDamagedError(TlEmbedError):
    """A search index cannot be read back whole; it must be rebuilt from its store."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"index {path} is damaged ({reason}); rebuild it with `tl-embed index STORE --out {path}`")
