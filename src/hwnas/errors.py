"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class HwnasError(Exception):
    """Bad input or an unmet request. The message says what to fix."""

    exit_code = 2


class BudgetError(HwnasError):
    """No evaluated candidate meets the budget."""

    exit_code = 3
