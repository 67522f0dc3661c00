"""The guest's init (initramfs/init.c): compiled once per (source, compiler, flags), cached.

musl-gcc (Debian's musl-tools) is preferred: ~60 KB static. `gcc -static` (glibc) is the fallback: it works
but weighs ~700 KB. The build is reproducible (no build id, stripped), so the cache key is also the
binary's identity.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .cache import atomic_file, cache_dir, is_temp, mount_point, no_space, remove_entry, touch
from .elf import MACHINES, parse
from .errors import MinimizeError, NoSpaceError, PackError
from .host import require
from .proc import run_tool
from .resources import data_dir

SOURCE = data_dir("initramfs") / "init.c"
FLAGS = (
    "-static",
    "-Os",
    "-s",
    "-Wall",
    "-Wextra",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-asynchronous-unwind-tables",
    "-Wl,--gc-sections",
    "-Wl,--build-id=none",
)


@dataclass(frozen=True)
class Arch:
    """How the init of one guest architecture is compiled."""

    need: str  # builder/host.py's need naming the compiler(s), first found is used
    env: str  # the variable that names another compiler


ARCHES = {  # its binary's ELF machine: elf.MACHINES
    "amd64": Arch("musl-gcc or gcc", "XBUILD_INIT_CC"),
    "arm64": Arch("aarch64-linux-musl-gcc or aarch64-linux-gnu-gcc", "XBUILD_INIT_CC_ARM64"),
}


def _arch(arch: str) -> Arch:
    try:
        return ARCHES[arch]
    except KeyError:
        served = ", ".join(ARCHES)
        raise PackError(f"no guest init for architecture {arch!r} (xbuild builds {served})") from None


def compiler(arch: str = "amd64") -> str:
    """The compiler used for `arch`: its variable ($XBUILD_INIT_CC for amd64, $XBUILD_INIT_CC_ARM64 for
    arm64) if set, else the first tool of its builder/host.py need."""
    a = _arch(arch)
    cc = os.environ.get(a.env)
    if not cc:
        (path,) = require(a.need, error=PackError)
        return path
    found = shutil.which(cc)
    if found is None:
        raise PackError(f"no C compiler to build the guest init: {a.env}={cc} is not found")
    return found


def check_binary(data: bytes, arch: str, what: str) -> None:
    """PackError unless `data` is a static ELF executable for `arch`'s machine."""
    try:
        info = parse(data, what)
    except MinimizeError as e:
        raise PackError(str(e)) from None
    _arch(arch)
    want = MACHINES[arch]
    if not info.static or info.machine != want or info.etype != "ET_EXEC":
        raise PackError(
            f"{what} is not a static {want} executable ({info.machine}, {info.etype}, "
            f"{'static' if info.static else 'dynamic'})"
        )


def build_command(cc: str, source: Path, out: Path) -> list[str]:
    return [cc, *FLAGS, "-o", str(out), str(source)]


def _version(cc: str) -> str:
    r = run_tool([cc, "--version"], PackError, timeout=30, check=False)
    # musl-gcc is a wrapper around gcc: name the wrapper too, so the two never share a cache entry
    return f"{Path(cc).name}\n{r.stdout}"


def cache_key(source: bytes, cc: str, arch: str = "amd64") -> str:
    h = hashlib.sha256()
    for part in (arch.encode(), source, _version(cc).encode(), " ".join(FLAGS).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def key(arch: str = "amd64") -> str:
    """The cache key of the init `init_binary(arch)` gives, without compiling it."""
    return cache_key(_source(), compiler(arch), arch)


def _source() -> bytes:
    try:
        return SOURCE.read_bytes()
    except OSError as e:
        raise PackError(f"cannot read the init source {SOURCE}: {e}") from None


def init_binary(arch: str = "amd64") -> bytes:
    """The static init binary for `arch`, built on first use and cached under cache_dir('init', key) with
    its sha256 beside it (`init.sha256`): a cached binary that does not match it (or a missing or odd
    entry) is compiled again. PackError if the compiler gives no static executable for `arch`."""
    cc = compiler(arch)
    entry = cache_dir("init", cache_key(_source(), cc, arch))
    final, sums = entry / "init", entry / "init.sha256"
    cached = _cached(final, sums)
    if cached is not None:
        return cached
    remove_entry(final)
    tmpdir = Path(tempfile.gettempdir())
    with no_space(tmpdir), tempfile.TemporaryDirectory(prefix="xbuild-init.") as tmp:
        out = Path(tmp) / "init"
        cmd = build_command(cc, SOURCE, out)
        r = run_tool(cmd, PackError, timeout=300, check=False)
        if r.returncode != 0:
            if os.strerror(errno.ENOSPC) in r.stderr + r.stdout:
                raise NoSpaceError(f"no space left on {mount_point(tmpdir)} (compiling the guest init)")
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            raise PackError(f"building the guest init failed ({' '.join(cmd)}): {' | '.join(tail)}")
        data = out.read_bytes()
    check_binary(data, arch, f"the guest init built by {cc}")
    with atomic_file(sums, "w") as f:
        f.write(hashlib.sha256(data).hexdigest() + "\n")
    with atomic_file(final) as f:
        os.fchmod(f.fileno(), 0o755)
        f.write(data)
    return data


def cached(key: str) -> bytes | None:
    """The init of the cache entry `key` if it is there and matches its recorded sha256, else None."""
    entry = cache_dir("init") / key
    return _cached(entry / "init", entry / "init.sha256")


def verify_cached() -> Iterator[tuple[Path, str | None]]:
    """Check every cached init against its sha256: (entry, None) if good, (entry, why) if bad (removed)."""
    for entry in sorted(cache_dir("init").iterdir()):
        if is_temp(entry.name):
            continue
        if _cached(entry / "init", entry / "init.sha256") is not None:
            yield entry, None
        else:
            remove_entry(entry)
            yield entry, "the binary is missing or does not match init.sha256"


def _cached(final: Path, sums: Path) -> bytes | None:
    """The cached init if it is a regular file matching its recorded sha256, else None."""
    try:
        with open(final, "rb", opener=_nofollow) as f, open(sums, opener=_nofollow) as s:
            data, want = f.read(), s.read().strip()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != want:
        return None
    touch(final.parent)
    return data


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
