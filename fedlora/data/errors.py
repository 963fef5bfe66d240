"""Data errors that point at the exact place in the user's file."""


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
