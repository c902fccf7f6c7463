"""The one exception type for failures the user can act on, and the one way text from outside is shown."""

import os

# C0 and C1 control characters and DEL, shown as Python escapes: a member name or a registry's error text
# must never move the cursor, retitle the terminal or inject a line into what the user reads.
CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: str) -> str:
    """`text` with every control character (newlines and tabs included) escaped."""
    return text.translate(CONTROLS)


def os_error_line(err: OSError) -> str:
    """An OSError as the user reads it (a full disk, a folder where a file should be): the file and the reason."""
    name = err.filename
    where = f"{printable(os.fsdecode(name) if isinstance(name, str | bytes) else str(name))}: " if name else ""
    return f"{where}{err.strerror or err}"


class Error(Exception):
    """A user-facing failure: `message` says what went wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        # One line, always: the command-line edge prints exactly this, control characters escaped.
        return printable(f"{self.message}; {self.hint}" if self.hint else self.message)
