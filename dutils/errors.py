"""The one exception type for failures the user can act on."""


class Error(Exception):
    """A user-facing failure: `message` says what went wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        # One line, always: the command-line edge prints exactly this.
        text = f"{self.message}; {self.hint}" if self.hint else self.message
        return " ".join(text.split())
