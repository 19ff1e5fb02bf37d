"""Exceptions that reach the user as one line (the CLI prints them and exits 2)."""


class ClipError(Exception):
    """A problem with the user's input or environment, told in one line."""

    exit_code = 2

    def __str__(self) -> str:  # never let a multi-line message through to the CLI
        return " ".join(super().__str__().split())


class ConfigError(ClipError):
    """A config file or override is wrong: unknown key, bad type, bad value."""


class SchemaError(ClipError):
    """A table is missing a column or has one of the wrong type."""


class StorageError(ClipError):
    """A location cannot be read or written: missing bucket, bad credentials, disk full."""


class StageFailed(ClipError):
    """Some shards of a stage failed after their retries; the message lists them."""

    exit_code = 1
