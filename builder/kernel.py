"""Trimmed guest kernels: `make tinyconfig` + fragments from `kernels/`, built once per hash, verified.

One kernel per architecture (ARCHES: "amd64", "arm64", named as OCI and Debian name them). The amd64 one
boots as a Xen PV guest, a Xen PVH guest and under QEMU; the arm64 one, cross-compiled with Debian's
aarch64-linux-gnu-gcc, as a Xen guest on arm64 and under QEMU `-M virt`. A fragment name means
`kernels/<arch>/<name>.config` where the architecture has its own, else the shared `kernels/<name>.config`.
The source gets the patches in `kernels/patches/` (applied in name order; one that changes only another
architecture's arch/ files is left out). `build()` caches each result in
`$XBUILD_CACHE/kernels/<key>/` where key = sha256(the arch's recipe, source, fragment texts, patch texts,
the compiler's `--version`); `verify()` reads the Xen ELF notes of an amd64 kernel (from the ELF itself or
from inside a bzImage's compressed payload), and the Image header and the embedded .config of an arm64 one.

The cache entry is untrusted like every other: kernel.json records the sha256 of each file of the entry
(RECORD), written when the kernel is built or pulled; `cached()` checks them whenever the entry is used and
removes a bad entry, which is then built (or pulled) again. While a process uses an entry it holds a shared
flock on its directory, so `xbuild cache prune` leaves it alone. An entry written before the record existed
is recorded from its files on first use (trust on first use; see `cached`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import elf
from .cache import (
    atomic_dir,
    atomic_file,
    cache_dir,
    file_sha256,
    is_temp,
    lock_shared,
    one_builder,
    remove_entry,
    touch,
)
from .compression import CorruptData, decompress, sniff
from .elf import ELF_MAGIC
from .errors import CacheError, KernelError
from .host import KERNEL, KERNEL_SOURCES, install_hint, needs_of, require
from .options import Say
from .proc import run_tool
from .resources import data_dir

KERNELS_DIR = data_dir("kernels")
PATCHES_DIR = KERNELS_DIR / "patches"  # every *.patch here is applied to every kernel xbuild builds
KERNEL_JSON = "kernel.json"
RECORD = "sha256"  # kernel.json: {file name: hex sha256} of every other file of the entry


@dataclass(frozen=True)
class Arch:
    """How xbuild builds one architecture's kernel: all that differs between architectures is this data."""

    name: str  # OCI/Debian name: "amd64", "arm64"
    make_vars: tuple[str, ...]  # ARCH= and CROSS_COMPILE= for every make call (none: the host's own)
    compiler: str  # the C compiler whose `--version` is part of the key
    srcarch: str  # the kernel's arch/ directory (Kconfig's $(SRCARCH))
    target: str  # the make target
    image: str  # the built boot file under O=, copied into the entry under its own name
    fmt: str  # the artifact's boot file: "elf" (the stripped vmlinux, see kernels/README.md) or "image"
    fragments: tuple[str, ...]  # the default kernel's
    recipe: str  # hashed first into the key


ARCHES = {
    "amd64": Arch(
        "amd64",
        (),
        "gcc",
        "x86",
        "bzImage",
        "arch/x86/boot/bzImage",
        "elf",
        ("base", "xen", "net", "qemu", "block", "compat"),
        "xbuild-kernel-1: tinyconfig, fragments merged with allnoconfig, make bzImage",
    ),
    "arm64": Arch(
        "arm64",
        ("ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"),
        "aarch64-linux-gnu-gcc",
        "arm64",
        "Image",
        "arch/arm64/boot/Image",
        "image",
        ("base", "arch", "xen", "net", "qemu", "block", "compat"),
        "xbuild-kernel-1 arm64: tinyconfig, fragments merged with allnoconfig, "
        "make ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- Image",
    ),
}
DEFAULT_FRAGMENTS = ARCHES["amd64"].fragments


def arch_of(name: str) -> Arch:
    """The Arch called `name`; KernelError naming the known ones for anything else."""
    try:
        return ARCHES[name]
    except KeyError:
        raise KernelError(f"no kernel for architecture {name!r} (known: {', '.join(ARCHES)})") from None


@dataclass(frozen=True)
class Kernel:
    """A built kernel in the cache."""

    key: str
    path: Path  # the bootable file: `vmlinux` (stripped ELF), `bzImage` or (arm64) `Image`
    fmt: str  # "elf", "bzimage" or "image"
    fragments: tuple[str, ...]
    release: str
    size: int
    bzimage: Path | None  # amd64: always built, QEMU and Xen boot it too; None for arm64
    patches: tuple[str, ...] = ()  # the kernels/patches/ file names applied (none: built before patches)
    arch: str = "amd64"


@dataclass(frozen=True)
class KernelInfo:
    """What `verify()` found in a kernel file."""

    path: Path
    fmt: str  # "elf", "bzimage" or "image" (arm64)
    modes: tuple[str, ...]  # subset of ("pv", "pvh", "qemu") for amd64, of ("xen", "qemu") for arm64
    entry: int | None  # XEN_ELFNOTE_ENTRY (PV)
    phys32_entry: int | None  # XEN_ELFNOTE_PHYS32_ENTRY (PVH, and QEMU's -kernel for an ELF)


@dataclass(frozen=True)
class Dropped:
    """A fragment line that did not survive into the final .config."""

    symbol: str  # without CONFIG_
    wanted: str
    got: str
    fragment: str
    unmet: tuple[str, ...]  # dependency expressions that are false, with their symbols' values

    def __str__(self) -> str:
        why = "; ".join(self.unmet) or "no unmet dependency found (select, choice or range?)"
        return f"CONFIG_{self.symbol}={self.wanted} ({self.fragment}) became {self.got}: {why}"


# ---------------------------------------------------------------------------------------------- fragments


def fragment_path(name: str, arch: str = "amd64") -> Path:
    """`kernels/<arch>/<name>.config` if the architecture has its own, else `kernels/<name>.config`, or
    `name` itself if it is a path to a file."""
    p = Path(name)
    if p.suffix == ".config" and p.is_file():
        return p
    for p in (KERNELS_DIR / arch / f"{name}.config", KERNELS_DIR / f"{name}.config"):
        if p.is_file():
            return p
    known = ", ".join(sorted({f.stem for d in (KERNELS_DIR, KERNELS_DIR / arch) for f in d.glob("*.config")}))
    raise KernelError(f"no kernel fragment {name!r} for {arch} (known: {known})")


def arch_fragments(fragments: Iterable[str], arch: str) -> tuple[str, ...]:
    """Those of `fragments` that are the architecture's own (`kernels/<arch>/`): they may override what a
    shared fragment before them sets (check_fragments' `overriding`)."""
    return tuple(n for n in fragments if fragment_path(n, arch).parent == KERNELS_DIR / arch)


_LINE = re.compile(r"^(?:CONFIG_(\w+)=(.*)|# CONFIG_(\w+) is not set)\s*$")


def parse_config(text: str) -> dict[str, str]:
    """Symbol (without CONFIG_) → value ("n" for `# CONFIG_X is not set`) of a .config or fragment."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if m := _LINE.match(line.strip()):
            out[m[1] or m[3]] = m[2] if m[1] else "n"
    return out


def check_fragments(
    fragments: Mapping[str, str],
    config_text: str,
    kconfig_root: Path | None = None,
    srcarch: str = "x86",
    overriding: Collection[str] = (),
) -> list[Dropped]:
    """Every symbol a fragment (name → text, in merge order) sets that the final .config does not have as
    asked. Fragments disagreeing on a symbol are named, unless the later one is in `overriding` (an
    architecture's own fragment: its value replaces the shared fragment's, as merge_config.sh does).

    With `kconfig_root` (a kernel source tree, `srcarch` its arch/ directory), each one is explained by its
    false `depends on`/`if`.
    """
    final = parse_config(config_text)
    asked = {name: parse_config(text) for name, text in fragments.items()}
    names = list(asked)
    deps = KconfigDeps(kconfig_root, srcarch) if kconfig_root else None
    dropped = []
    for name, syms in asked.items():
        later = names[names.index(name) + 1 :]
        for sym, wanted in syms.items():
            if any(sym in asked[o] for o in later if o in overriding):
                continue
            got = final.get(sym, "n")
            if got.strip('"') == wanted.strip('"'):
                continue
            clash = tuple(
                f"fragment {other} sets it to {v[sym]}"
                for other, v in asked.items()
                if v.get(sym, wanted) != wanted
            )
            unmet = clash or (deps.unmet(sym, final) if deps else ())
            dropped.append(Dropped(sym, wanted, got, name, unmet))
    return dropped


class KconfigDeps:
    """The `depends on`, enclosing `if`/`menu` and prompt conditions of every symbol, from a Kconfig tree."""

    def __init__(self, root: Path, arch: str = "x86") -> None:
        self.root = root
        self.arch = arch
        self.deps: dict[str, list[str]] = {}
        self._parse(root / "Kconfig", [])

    def _parse(self, path: Path, outer: list[str]) -> None:
        stack = list(outer)  # conditions of enclosing if/menu/choice blocks
        marks: list[int] = []
        sym: str | None = None
        block_opened = False  # a menu/choice whose own `depends on` lines follow
        help_indent: int | None = None  # inside help text: its indentation (0 until its first line)
        for raw in path.read_text(errors="replace").splitlines():
            indent = len(raw.expandtabs()) - len(raw.expandtabs().lstrip())
            if help_indent is not None:
                if not raw.strip():
                    continue
                if help_indent == 0 or indent >= help_indent:
                    help_indent = help_indent or indent
                    continue
                help_indent = None
            line = raw.split("#", 1)[0].strip()
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            if word in ("help", "---help---"):
                help_indent = 0
            elif word in ("config", "menuconfig"):
                sym, block_opened = rest, False
                self.deps.setdefault(sym, []).extend(stack)
            elif word in ("if", "menu", "choice"):
                sym = None
                marks.append(len(stack))
                if word == "if":
                    stack.append(rest)
                block_opened = word != "if"
            elif word in ("endif", "endmenu", "endchoice") and marks:
                del stack[marks.pop() :]
                sym, block_opened = None, False
            elif word in ("source", "osource", "rsource", "orsource"):
                sym = None
                pattern = rest.strip('"').replace("$(SRCARCH)", self.arch)
                base = path.parent if word.startswith(("r", "or")) else self.root
                for f in sorted(glob.glob(str(base / pattern))):
                    self._parse(Path(f), stack)
            elif word == "depends" and rest.startswith("on "):
                expr = rest[3:].strip()
                if sym:
                    self.deps[sym].append(expr)
                elif block_opened:
                    stack.append(expr)
            elif sym and word in ("bool", "tristate", "prompt", "int", "hex", "string") and " if " in rest:
                self.deps[sym].append(rest.rsplit(" if ", 1)[1].strip())
            elif word in ("comment", "mainmenu"):
                sym = None

    def unmet(self, sym: str, config: Mapping[str, str]) -> tuple[str, ...]:
        """The dependency expressions of `sym` that are false under `config`, annotated with values."""
        if sym not in self.deps:
            return ("no such symbol in this kernel's Kconfig",)
        out = []
        for expr in dict.fromkeys(self.deps[sym]):
            if _eval(expr, config) == 0:
                names = dict.fromkeys(
                    t for t in _tokens(expr) if re.fullmatch(r"[A-Z0-9_]+", t) and len(t) > 1
                )
                vals = " ".join(f"{n}={config.get(n, 'n')}" for n in names)
                out.append(f"depends on {expr} [{vals}]")
        return tuple(out)


def _tokens(expr: str) -> list[str]:
    return re.findall(r'"[^"]*"|&&|\|\||!=|<=|>=|[!=<>()]|[\w.$-]+', expr)


def _eval(expr: str, config: Mapping[str, str]) -> int:
    """Kconfig tristate value (0, 1, 2) of a dependency expression; unknown constructs count as true."""
    toks = _tokens(expr)
    pos = 0

    def value(tok: str) -> str:
        if tok.startswith('"'):
            return tok.strip('"')
        return config.get(tok, tok if tok in ("y", "m", "n") or not tok.isupper() else "n")

    def tri(v: str) -> int:
        return {"y": 2, "m": 1}.get(v, 0)

    def atom() -> int:
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok == "!":
            return 2 - atom()
        if tok == "(":
            v = disj()
            pos += 1
            return v
        if pos < len(toks) and toks[pos] in ("=", "!=", "<", ">", "<=", ">="):
            op, other = toks[pos], toks[pos + 1]
            pos += 2
            a, b = value(tok), value(other)
            res = {"=": a == b, "!=": a != b}.get(op)
            if res is None:
                try:
                    x, y = int(a, 0), int(b, 0)
                except ValueError:
                    return 2
                res = {"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]
            return 2 if res else 0
        return tri(value(tok))

    def conj() -> int:
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos] == "&&":
            pos += 1
            v = min(v, atom())
        return v

    def disj() -> int:
        nonlocal pos
        v = conj()
        while pos < len(toks) and toks[pos] == "||":
            pos += 1
            v = max(v, conj())
        return v

    try:
        return disj()
    except (IndexError, KeyError):
        return 2


# ---------------------------------------------------------------------------------------------- building


def default_source() -> Path:
    """The newest `/usr/src/linux-source-*.tar.*` (Debian's linux-source-X.Y package)."""
    found = glob.glob(KERNEL_SOURCES)
    if not found:
        raise KernelError(f"no kernel source: {install_hint('linux-source')} or pass --source")

    def version(p: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(p).name.split(".tar")[0]))

    return Path(max(found, key=version))


def patches(arch: str = "amd64") -> dict[str, str]:
    """The patches `arch`'s kernel gets: {file name: text} of `kernels/patches/*.patch`, in name order, but
    for those whose every file lies under another architecture's arch/ directory (an x86 patch is neither
    applied to the arm64 kernel nor part of its key, so changing it does not rebuild that kernel)."""
    own = f"arch/{arch_of(arch).srcarch}/"
    texts = {p.name: p.read_text() for p in sorted(PATCHES_DIR.glob("*.patch"))}
    return {name: text for name, text in texts.items() if _touches(text, own)}


def _touches(patch: str, own: str) -> bool:
    """Whether a unified diff changes a file outside arch/, or under `own` (an arch/ARCH/ directory)."""
    files = re.findall(r"^\+\+\+ b/(\S+)", patch, re.M)
    return not files or any(not f.startswith("arch/") or f.startswith(own) for f in files)


def cache_key(
    source: Path,
    fragments: Mapping[str, str],
    toolchain: str,
    patch_texts: Mapping[str, str] | None = None,
    arch: str = "amd64",
) -> str:
    """sha256 of the architecture's recipe, the source (tarball bytes, or each file's path and content), the
    fragments, the patches (None: those of `patches(arch)`), the toolchain (its compiler's `--version`)."""
    h = hashlib.sha256(arch_of(arch).recipe.encode() + b"\0")
    if source.is_dir():
        for f in sorted(p for p in source.rglob("*") if ".git" not in p.parts and not p.is_dir()):
            h.update(str(f.relative_to(source)).encode() + b"\0")
            h.update(os.readlink(f).encode() if f.is_symlink() else _file_digest(f))
    else:
        h.update(_file_digest(source))
    for name, text in fragments.items():
        h.update(f"\0fragment {name}\0{text}".encode())
    for name, text in (patches(arch) if patch_texts is None else patch_texts).items():
        h.update(f"\0patch {name}\0{text}".encode())
    h.update(b"\0toolchain\0" + toolchain.encode())
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    """The sha256 of a file, remembered per (path, device, inode, size, mtime) within the process: the
    source tarball is hashed once for `build_key` and `build` (~1 s each)."""
    st = path.stat()
    return _digest(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _digest(path: str, *identity: int) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _toolchain(arch: str = "amd64") -> str:
    """`--version` of the compiler that builds `arch`'s kernel (part of the key)."""
    cc = arch_of(arch).compiler
    return run_tool([cc, "--version"], KernelError, hint=install_hint(cc)).stdout


def build_key(
    fragments: tuple[str, ...] | None = None, source: Path | None = None, arch: str = "amd64"
) -> str:
    """The cache key of the kernel `build(fragments, source, arch=arch)` gives, without building it."""
    return _plan(fragments, source, True, arch_of(arch)).key


@dataclass(frozen=True)
class _Plan:
    source: Path
    fragments: tuple[str, ...]
    texts: dict[str, str]  # fragment name → text, in merge order
    patch_texts: dict[str, str]
    key: str


def _plan(fragments: tuple[str, ...] | None, source: Path | None, patched: bool, arch: Arch) -> _Plan:
    """The source (default_source() when None), the fragments (the arch's default when None), their and the
    patches' texts by name (no patches unless `patched`), and the cache key."""
    source = Path(source) if source else default_source()
    if not source.exists():
        raise KernelError(f"kernel source {source} does not exist")
    fragments = tuple(fragments or arch.fragments)
    texts = {name: fragment_path(name, arch.name).read_text() for name in fragments}
    patch_texts = patches(arch.name) if patched else {}
    key = cache_key(source, texts, _toolchain(arch.name), patch_texts, arch.name)
    return _Plan(source, fragments, texts, patch_texts, key)


def build(
    fragments: tuple[str, ...] | None = None,
    source: Path | None = None,
    progress: Say | None = None,
    patched: bool = True,
    arch: str = "amd64",
) -> Kernel:
    """Build (or reuse from the cache) the `arch` kernel for `fragments` (None: the arch's default) from
    `source` (tarball or clean tree), with kernels/patches/ applied unless not `patched` (for measuring
    what they do).

    `fragments`: names of `kernels/[<arch>/]<name>.config` or paths to fragments. `progress` gets every line
    of the build's output (and a few `xbuild: ...` phase lines).
    The result lands in `$XBUILD_CACHE/kernels/<key>/`: for amd64 vmlinux (stripped) and bzImage, for arm64
    Image; config, System.map, build.log, kernel.json. A failed build leaves `<key>.log` (and
    `<key>.config`) beside it. One process at a time builds a key (cache.one_builder): a second xbuild that
    needs the same kernel waits for it instead of compiling it too.
    """
    a = arch_of(arch)
    plan = _plan(fragments, source, patched, a)
    final = cache_dir("kernels") / plan.key
    kernel, bad = _look(final)
    if kernel:
        return kernel
    say = progress or (lambda line: None)
    with one_builder(final, lambda: say(f"xbuild: waiting for another build of kernel {plan.key[:12]}")):
        kernel, worse = _look(final)  # another process may have built it while this one waited
        if kernel:
            return kernel
        bad = bad or worse
        try:
            return _build(final, plan, a, progress)
        except KernelError as e:
            if bad is None:
                raise
            raise CacheError(f"{bad}; building it again failed: {str(e).splitlines()[0]}") from None


def _look(final: Path) -> tuple[Kernel | None, CacheError | None]:
    """The cached kernel at `final` (None if there is none), or the CacheError of a bad entry (removed: the
    caller builds it again and names it if that fails)."""
    try:
        return cached(final), None
    except CacheError as bad:
        return None, bad


def _build(final: Path, plan: _Plan, arch: Arch, progress: Say | None) -> Kernel:
    key, source, texts, patch_texts = plan.key, plan.source, plan.texts, plan.patch_texts
    cross = (arch.compiler,) if arch.make_vars else ()
    require(*(n for n in needs_of(KERNEL) if n != "linux-source"), *cross, error=KernelError)
    say = progress or (lambda line: None)
    log_path = cache_dir("kernels") / f"{key}.log"
    with atomic_dir(final) as out, log_path.open("w") as log:

        def run(*cmd: str, cwd: Path) -> None:
            say(f"xbuild: {' '.join(cmd)}")
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                say(line.rstrip("\n"))
            if proc.wait():
                log.flush()
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
                raise KernelError(f"kernel build failed: {' '.join(cmd)} (log: {log_path})\n{tail}")

        # the work tree lives inside `out`, which atomic_dir holds under a flock: a temp beside it would be
        # collected (collect_temps) by any xbuild started once its directory has not changed for an hour,
        # and on a loaded machine a build takes longer than that
        with tempfile.TemporaryDirectory(prefix=".work.", dir=out) as work_s:
            work = Path(work_s)
            src = _unpack(source, work, run, copy=bool(patch_texts))
            for name in patch_texts:
                run("patch", "-p1", "--batch", "--forward", "-i", str(PATCHES_DIR / name), cwd=src)
            obj = work / "obj"
            make = ("make", f"O={obj}", *arch.make_vars)
            run(*make, "tinyconfig", cwd=src)
            merged = work / "merged.config"
            merged.write_text((obj / ".config").read_text() + "".join(texts.values()))
            run(*make, f"KCONFIG_ALLCONFIG={merged}", "allnoconfig", cwd=src)
            config = (obj / ".config").read_text()
            overriding = arch_fragments(plan.fragments, arch.name)
            if dropped := check_fragments(texts, config, src, arch.srcarch, overriding):
                kept = shutil.copy(obj / ".config", cache_dir("kernels") / f"{key}.config")
                raise KernelError(
                    f"kernel config drops {len(dropped)} requested symbol(s) (final .config: {kept}): "
                    + " | ".join(map(str, dropped))
                )
            run(*make, f"-j{os.cpu_count() or 1}", arch.target, cwd=src)
            release = run_tool([*make, "-s", "kernelrelease"], KernelError, cwd=src).stdout.strip()
            shutil.copy(obj / arch.image, out / Path(arch.image).name)
            if arch.fmt == "elf":
                run_tool(["strip", "-o", str(out / "vmlinux"), str(obj / "vmlinux")], KernelError)
            shutil.copy(obj / ".config", out / "config")
            shutil.copy(obj / "System.map", out / "System.map")
        log.close()
        shutil.move(log_path, out / "build.log")
        name = "vmlinux" if arch.fmt == "elf" else Path(arch.image).name
        kernel = Kernel(
            key,
            final / name,
            arch.fmt,
            plan.fragments,
            release,
            (out / name).stat().st_size,
            final / "bzImage" if arch.name == "amd64" else None,
            tuple(patch_texts),
            arch.name,
        )
        verify(out / name, arch=arch.name)
        meta = dataclasses.asdict(kernel) | {
            "source": str(source),
            "fragment_texts": texts,
            "patch_texts": patch_texts,
        }
        write_record(out, meta)
    cached(final)  # hold it (shared flock) like any entry in use
    return kernel


def _unpack(source: Path, work: Path, run: Callable[..., None], copy: bool) -> Path:
    """The source tree to build from: the tarball unpacked in `work`; a directory `source` itself, or a
    copy of it in `work` when `copy` (it is to be patched: the user's tree is never changed)."""
    src = work / "src"
    if source.is_dir():
        if not copy:
            return source
        run("cp", "-a", f"{source}/.", str(src), cwd=work)
        return src
    src.mkdir()
    run("tar", "-xf", str(source), "-C", str(src), "--strip-components=1", cwd=work)
    return src


def _load(d: Path, meta: dict[str, Any] | None = None) -> Kernel:
    meta = meta if meta is not None else json.loads((d / KERNEL_JSON).read_text())
    arch = str(meta.get("arch", "amd64"))  # entries from before arm64 have none
    return Kernel(
        key=meta["key"],
        path=d / Path(meta["path"]).name,
        fmt=meta["fmt"],
        fragments=tuple(meta["fragments"]),
        release=meta["release"],
        size=meta["size"],
        bzimage=d / "bzImage" if arch == "amd64" else None,
        patches=tuple(meta.get("patches") or ()),
        arch=arch,
    )


def list_kernels() -> list[Kernel]:
    """Every complete kernel in the cache, newest first (as recorded: `cached` checks one before use)."""
    dirs = [d for d in cache_dir("kernels").iterdir() if (d / KERNEL_JSON).is_file()]
    return [_load(d) for d in sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True)]


# ---------------------------------------------------------------------------------------------- the cache

_held: dict[Path, int] = {}  # kernel dir -> its fd, under a shared flock for the life of the process


def write_record(d: Path, meta: dict[str, Any]) -> None:
    """Write `d`/kernel.json: `meta` plus the sha256 of every other file of `d` (RECORD)."""
    files = sorted(p for p in d.iterdir() if p.name != KERNEL_JSON and not is_temp(p.name))
    record = {p.name: file_sha256(p) for p in files}
    with atomic_file(d / KERNEL_JSON, "w") as f:
        f.write(json.dumps(meta | {RECORD: record}, indent=2, default=str) + "\n")


def cached(d: Path) -> Kernel | None:
    """The kernel of the cache entry `d`, every file checked against the sha256 kernel.json records; None if
    there is no entry. A bad entry (kernel.json unreadable, a file missing, not a regular file or not its
    recorded sha256) is removed and CacheError names what was wrong: the caller builds or pulls it again.

    The entry's directory stays open under a shared flock for the life of the process, so `xbuild cache
    prune` does not remove it while a build copies the kernel from it.

    An entry written by an xbuild older than the record has none: its files are recorded now, from what they
    are. Nothing ever checked them before, so this lowers no guarantee those entries had, and every later use
    and `xbuild cache verify` check them; the alternative, rebuilding, costs ten minutes of every core for
    each such kernel (a pulled one has no source to rebuild from at all, until pulled again).
    """
    kernel, why = _check(d)
    if why is not None:
        raise CacheError(f"{why}: corrupt cache entry (removed)")
    return kernel


def _check(d: Path) -> tuple[Kernel | None, str | None]:
    """(the kernel, None) for a good entry, now held; (None, why) for a bad one, removed; (None, None) if
    there is none."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError:  # a symlink or a file where the directory should be
        remove_entry(d)
        return None, f"{d} is not a directory"
    lock_shared(fd)
    held = _held.pop(d, None)
    if held is not None:
        os.close(held)
    why = _bad_kernel(d)
    if why is None:
        _held[d] = fd
        touch(d)
        return _load(d), None
    os.close(fd)
    remove_entry(d)
    return None, why


def _bad_kernel(d: Path) -> str | None:
    """What is wrong with the kernel entry `d` (a path and why), or None; records a legacy entry."""
    try:
        meta = json.loads((d / KERNEL_JSON).read_text())
        _load(d, meta)
    except FileNotFoundError:
        return f"{d / KERNEL_JSON} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{d / KERNEL_JSON} is unreadable"
    record = meta.get(RECORD)
    if record is None:
        write_record(d, meta)
        return None
    if not isinstance(record, dict) or Path(meta["path"]).name not in record:
        return f"{d / KERNEL_JSON} records no sha256 of {Path(meta['path']).name}"
    for name, want in sorted(record.items()):
        path = d / Path(str(name)).name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError:
            return f"{path} is not a regular file"
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return f"{path} is not a regular file"
        with os.fdopen(fd, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != want:
            return f"{path}: content hashes to sha256:{actual[:12]}…, kernel.json records {str(want)[:12]}…"
    return None


def verify_cached() -> Iterator[tuple[Path, str | None]]:
    """Check every kernel entry (`cached`): (dir, None) for a good one, (dir, why) for a bad one, removed.
    A failed build's `<key>.log` and `<key>.config` beside them are not entries."""
    for d in sorted(cache_dir("kernels").iterdir()):
        if is_temp(d.name) or (d.suffix in (".log", ".config") and not d.is_dir()):
            continue
        yield d, _check(d)[1]


def default_kernel(progress: Say | None = None, arch: str = "amd64") -> Kernel:
    """The `arch` kernel of the arch's default fragments from the default source; built on first use."""
    return build(None, None, progress, arch=arch)


def cmdline(arch: str = "amd64") -> str:
    """The default boot flags of `arch`'s kernel from `kernels/[<arch>/]cmdline`, comments stripped; the
    runner adds the console."""
    own = KERNELS_DIR / arch / "cmdline"
    lines = (own if own.is_file() else KERNELS_DIR / "cmdline").read_text().splitlines()
    return " ".join(w for line in lines for w in line.split("#", 1)[0].split())


# ---------------------------------------------------------------------------------------------- verify

XEN_ELFNOTE_ENTRY = 1
XEN_ELFNOTE_GUEST_OS = 6
XEN_ELFNOTE_PHYS32_ENTRY = 18


def verify(path: Path, require: tuple[str, ...] | None = None, arch: str = "amd64") -> KernelInfo:
    """What the kernel file `path` boots as; KernelError if a `require`d mode is missing (None: every Xen
    mode of the arch, ("pv", "pvh") for amd64, ("xen",) for arm64).

    amd64: the Xen ELF notes of a vmlinux ELF or a bzImage. arm64: the Image header (of a gzip-compressed
    Image too), and Xen guest support from the .config the Image embeds (IKCONFIG), else from the one beside
    it: `config` (an xbuild cache entry) or `config-<release>` beside `vmlinuz-<release>` (Debian's /boot).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KernelError(f"kernel {path}: cannot read: {e.strerror}") from None
    if arch_of(arch).fmt == "image":
        return _verify_image(path, data, require or ("xen",))
    require = require or ("pv", "pvh")
    fmt, image = ("elf" if data[:4] == ELF_MAGIC else "bzimage"), vmlinux(path, data)
    notes = dict(_xen_notes(path, image))
    entry = _addr(notes.get(XEN_ELFNOTE_ENTRY))
    phys32 = _addr(notes.get(XEN_ELFNOTE_PHYS32_ENTRY))
    modes = []
    if entry is not None and notes.get(XEN_ELFNOTE_GUEST_OS, b"").rstrip(b"\0") == b"linux":
        modes.append("pv")
    if phys32 is not None:
        modes.append("pvh")
    if fmt == "bzimage" or phys32 is not None:
        modes.append("qemu")
    missing = {
        "pv": "no Xen PV entry (XEN_ELFNOTE_ENTRY and GUEST_OS=linux); build with CONFIG_XEN_PV",
        "pvh": "no Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY); build with CONFIG_XEN_PVH",
        "qemu": "QEMU cannot boot it directly (an ELF without the PVH entry); build with CONFIG_PVH",
    }
    problems = [missing[m] for m in require if m not in modes]
    if problems:
        raise KernelError(f"kernel {path}: " + "; ".join(problems))
    return KernelInfo(path, fmt, tuple(modes), entry, phys32)


ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 0x38 of an arm64 Image (Documentation/arm64/booting.rst)
IKCONFIG_START, IKCONFIG_END = b"IKCFG_ST", b"IKCFG_ED"  # around the gzip'd .config (kernel/configs.c)


def _verify_image(path: Path, data: bytes, require: tuple[str, ...]) -> KernelInfo:
    """verify() of an arm64 kernel: "qemu" for any arm64 Image, "xen" where its embedded .config has the
    Xen guest support (XEN and its console HVC_XEN)."""
    image = data
    if sniff(data) == "gzip":
        try:
            image = decompress("gzip", data)
        except CorruptData as e:
            raise KernelError(f"kernel {path}: cannot decompress the gzip'd Image: {e}") from None
    if image[0x38:0x3C] != ARM64_IMAGE_MAGIC:
        raise KernelError(f"kernel {path}: not an arm64 Image (no ARM\\x64 magic at 0x38)")
    config = image_config(image)
    if config is None:
        beside = [path.with_name("config-" + path.name.removeprefix("vmlinuz-")), path.with_name("config")]
        config = next((parse_config(c.read_text(errors="replace")) for c in beside if c.is_file()), None)
    modes = ["qemu"]
    if config is not None and all(config.get(s) == "y" for s in ("XEN", "HVC_XEN")):
        modes.insert(0, "xen")
    no_xen = (
        "no Xen guest support (CONFIG_XEN and CONFIG_HVC_XEN)"
        if config is not None
        else "cannot tell its Xen guest support: no .config in it (CONFIG_IKCONFIG) nor beside it"
    )
    problems = [no_xen if m == "xen" else f"no mode {m!r} on arm64" for m in require if m not in modes]
    if problems:
        raise KernelError(f"kernel {path}: " + "; ".join(problems))
    return KernelInfo(path, "image", tuple(modes), None, None)


def image_config(image: bytes) -> dict[str, str] | None:
    """The .config a kernel image embeds (CONFIG_IKCONFIG), parsed; None if it embeds none."""
    start = image.find(IKCONFIG_START)
    end = image.find(IKCONFIG_END, start)
    if start < 0 or end < 0:
        return None
    try:
        return parse_config(decompress("gzip", image[start + len(IKCONFIG_START) : end]).decode())
    except (CorruptData, UnicodeDecodeError):
        return None


def _xen_notes(path: Path, image: bytes) -> Iterator[tuple[int, bytes]]:
    """(raw note type, descriptor bytes) of every note owned by "Xen"; KernelError if the notes cannot be
    read."""
    for name, ntype, desc in elf.notes(image, f"kernel {path}", KernelError):
        if name == "Xen":
            yield ntype, desc


def _addr(desc: bytes | None) -> int | None:
    if desc is None or len(desc) not in (4, 8):
        return None
    return int.from_bytes(desc, "little")


def vmlinux(path: Path, data: bytes) -> bytes:
    """The vmlinux ELF of the kernel file `path` holding `data`: an ELF as it is, a bzImage's payload
    decompressed (gzip, xz, zstd, lz4, bzip2, lzma); KernelError for anything else."""
    if data[:4] == ELF_MAGIC:
        return data
    if data[0x202:0x206] != b"HdrS":
        raise KernelError(f"kernel {path}: neither an ELF file nor a bzImage")
    payload = _bzimage_payload(path, data)
    if payload[:4] != ELF_MAGIC:
        raise KernelError(f"kernel {path}: the bzImage payload is not an ELF vmlinux")
    return payload


def _bzimage_payload(path: Path, data: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage: the setup header's payload, decompressed (builder.compression)."""
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    codec = sniff(payload)
    if codec == "none":
        raise KernelError(
            f"kernel {path}: unsupported bzImage compression (payload starts {payload[:4].hex()})"
        )
    try:
        return decompress(codec, payload)
    except CorruptData as e:
        raise KernelError(f"kernel {path}: cannot decompress the bzImage payload: {e}") from None
