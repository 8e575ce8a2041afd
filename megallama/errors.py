"""The three error types the library raises; the CLI turns each into one line and its exit code."""


class MegallamaError(Exception):
    """Base error. `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(MegallamaError):
    """Bad input: missing files, contradicting shapes, impossible TP/PP. Exit code 2."""

    exit_code = 2


class CheckFailed(MegallamaError):
    """A check ran and failed (verdict FAIL, smoke test failure). Exit code 1."""

    exit_code = 1
