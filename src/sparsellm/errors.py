"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class SparseLLMError(Exception):
    """A problem with the user's input or environment, described in one line."""


class OfflineError(SparseLLMError):
    """Something had to be downloaded, and the network or the library for it is not there."""
