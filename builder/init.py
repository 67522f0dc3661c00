"""The guest's init (initramfs/init.c): compiled once per (source, compiler, flags), cached.

musl-gcc (Debian's musl-tools) is preferred: ~60 KB static. `gcc -static` (glibc) is the fallback: it works
but weighs ~700 KB. The build is reproducible (no build id, stripped), so the cache key is also the
binary's identity.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .cache import atomic_file, cache_dir
from .errors import PackError
from .resources import data_dir

SOURCE = data_dir("initramfs") / "init.c"
FLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-ffunction-sections", "-fdata-sections",
         "-fno-asynchronous-unwind-tables", "-Wl,--gc-sections", "-Wl,--build-id=none")
COMPILERS = ("musl-gcc", "gcc")


def compiler() -> str:
    """The compiler used: $XBUILD_INIT_CC, else musl-gcc, else gcc."""
    cc = os.environ.get("XBUILD_INIT_CC")
    for c in ((cc,) if cc else COMPILERS):
        path = shutil.which(c)
        if path:
            return path
    raise PackError("no C compiler to build the guest init: install musl-tools (musl-gcc) or gcc "
                    "(Debian: apt-get install musl-tools)")


def build_command(cc: str, source: Path, out: Path) -> list[str]:
    return [cc, *FLAGS, "-o", str(out), str(source)]


def _version(cc: str) -> str:
    try:
        r = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise PackError(f"cannot run {cc}: {e}") from None
    # musl-gcc is a wrapper around gcc: name the wrapper too, so the two never share a cache entry
    return f"{Path(cc).name}\n{r.stdout}"


def cache_key(source: bytes, cc: str) -> str:
    h = hashlib.sha256()
    for part in (source, _version(cc).encode(), " ".join(FLAGS).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def init_binary() -> bytes:
    """The static init binary, built on first use and cached under cache_dir('init', key)."""
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        raise PackError(f"cannot read the init source {SOURCE}: {e}") from None
    cc = compiler()
    final = cache_dir("init", cache_key(src, cc)) / "init"
    if final.is_file():
        return final.read_bytes()
    with tempfile.TemporaryDirectory(prefix="xbuild-init.") as tmp:
        out = Path(tmp) / "init"
        cmd = build_command(cc, SOURCE, out)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except OSError as e:
            raise PackError(f"cannot run {cc}: {e}") from None
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            raise PackError(f"building the guest init failed ({' '.join(cmd)}): {' | '.join(tail)}")
        data = out.read_bytes()
    with atomic_file(final) as f:
        f.write(data)
    os.chmod(final, 0o755)
    return data
