"""Images in request bodies: base64 (optionally a data: URL), never fetched from a URL, header-checked before
decoding."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from kiln.errors import InputError
from kiln.imaging import header_size

_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)


def decode_b64(text: Any, what: str) -> bytes:
    """A base64 image (optionally a data: URL) -> bytes; refuses URLs and bad base64."""
    if not isinstance(text, str) or not text:
        raise InputError(f"{what}: expected a base64-encoded image string")
    if text.startswith(("http://", "https://", "file:", "ftp://")):
        raise InputError(f"{what}: image URLs are not fetched; send the image as base64")
    try:
        return base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: invalid base64") from None


def decode_b64_image(text: Any, what: str, max_pixels: int) -> bytes:
    """decode_b64, then the header check: unreadable (422) or more pixels than the cap (413), before decoding."""
    data = decode_b64(text, what)
    header_size(data, what, max_pixels)
    return data
