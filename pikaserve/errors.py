"""Errors that cross layers: what a client did wrong, as opposed to what broke."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request that can never run as asked; the server maps it to HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
