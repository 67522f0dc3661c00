"""Shared test set-up. Fixture modules live in tests/fixtures/ and are loaded as plugins."""

import os
import signal
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.registry",
    "tests.fixtures.dockerd",
    "tests.fixtures.minimize_images",
    "tests.fixtures.hostile",
    "tests.fixtures.warm_rig",
    "tests.fixtures.arm64",
]

# The tests signal the CLI as a terminal's Ctrl-C would. A shell that starts the suite in the background
# without job control (`cmd &` in a script) makes SIGINT ignored, children inherit that, and xbuild (like
# Python) keeps an inherited ignored SIGINT ignored: give the children a default SIGINT, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Slow fixtures (kernel, debootstrap images, Xen rig) are cached across runs in the user's cache.
os.environ.setdefault("XBUILD_CACHE", str(Path.home() / ".cache" / "xbuild"))


@pytest.fixture(scope="session")
def default_kernel_path() -> Path:
    """The trimmed default kernel (base+xen+net+qemu), built once into the cache on first use (~6-12 min)."""
    from builder.kernel import default_kernel

    return default_kernel().path
