"""Small checks of untrusted text shared by the parsers."""

from __future__ import annotations


def is_decimal(s: str) -> bool:
    """A plain ASCII decimal number: str.isdigit() also takes '²' and other digits int() refuses."""
    return s.isascii() and s.isdigit()
