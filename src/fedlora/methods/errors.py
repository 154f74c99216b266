"""Errors a method raises on a configuration it cannot run."""


class MethodError(ValueError):
    """A method option or client setup that the method cannot honour; one line, names the setting."""
