"""One exception type for everything a user can get wrong: the UI shows its message, the CLI
prints it as one line and exits non-zero, and logs keep the traceback."""


class ExplorerError(Exception):
    """A problem with the user's input or environment, with a message meant for them."""


class Cancelled(ExplorerError):
    """The user stopped a long job; whatever it had finished is kept."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)
