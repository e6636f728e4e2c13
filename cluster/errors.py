"""Errors a person can act on: the CLI prints them on one line and exits with code 2."""


class SpecshardError(Exception):
    """A failure caused by input or environment, explained in one sentence."""


class InvalidForward(SpecshardError):
    """A forward request that does not fit a stage's state; nothing was changed."""
