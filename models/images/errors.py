"""The one error type of image input: every decoder and check raises it with a stable code."""

from __future__ import annotations


class ImageError(ValueError):
    """Input image problem; ``code`` is a stable machine-readable reason (the service maps it to HTTP)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
