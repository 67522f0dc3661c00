"""Where xbuild's own data lives: kernels/, initramfs/ and recipes/.

In a source checkout they are at its top; a wheel or sdist ships them inside the package as
builder/data/<name> (pyproject.toml maps them there).
"""

from __future__ import annotations

from pathlib import Path


def data_dir(name: str) -> Path:
    """The directory `name` (kernels, initramfs or recipes) of this installation."""
    here = Path(__file__).resolve().parent
    shipped = here / "data" / name
    return shipped if shipped.is_dir() else here.parent / name
