"""ELF dependency closure, read through a `Tree` (never the host), searched like glibc's ld.so.

`parse(data)` gives an object's PT_INTERP, DT_NEEDED, DT_RPATH, DT_RUNPATH, class and machine; `loads` and
`notes` its loadable segments and notes (a kernel's size and Xen entry points, builder/memory.py and
builder/kernel.py). All read with bounds (`_Elf`), raising the caller's error type for a malformed file.
`Resolver(tree, env)` finds each DT_NEEDED the way ld.so does:
  1. a name with a '/' is used as it is;
  2. DT_RPATH of the object, then of each object that loaded it up to the executable
     (ignored when the object has DT_RUNPATH);
  3. LD_LIBRARY_PATH from the image's Env;
  4. DT_RUNPATH of the object (only for its own DT_NEEDED);
  5. the ld.so cache, i.e. the directories of /etc/ld.so.conf (with its `include` globs);
  6. the built-in defaults: the multiarch dirs, /lib64, /usr/lib64, /lib, /usr/lib.
musl (PT_INTERP ld-musl-*) searches /etc/ld-musl-ARCH.path or /lib:/usr/local/lib:/usr/lib instead of 5-6.
`$ORIGIN` is the directory the object was found in (for the executable, its real path), `$LIB` tries
lib, lib64 and the multiarch dir, `$PLATFORM` the machine name. A candidate of the wrong ELF class or
machine is skipped, as ld.so does. An unresolvable DT_NEEDED is a MinimizeError naming the library
and who needs it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from elftools.elf.enums import ENUM_E_MACHINE, ENUM_E_TYPE

from .errors import MinimizeError, XbuildError
from .tree import DIR, FILE, Tree, open_content, split

ELF_MAGIC = b"\x7fELF"
MACHINES = {"amd64": "EM_X86_64", "arm64": "EM_AARCH64"}  # OCI architecture -> e_machine of its programs
MULTIARCH = {
    "EM_X86_64": "x86_64-linux-gnu",
    "EM_AARCH64": "aarch64-linux-gnu",
    "EM_386": "i386-linux-gnu",
    "EM_ARM": "arm-linux-gnueabihf",
    "EM_RISCV": "riscv64-linux-gnu",
    "EM_PPC64": "powerpc64le-linux-gnu",
    "EM_S390": "s390x-linux-gnu",
}
PLATFORM = {
    "EM_X86_64": "x86_64",
    "EM_AARCH64": "aarch64",
    "EM_386": "i686",
    "EM_ARM": "armv7l",
    "EM_RISCV": "riscv64",
    "EM_PPC64": "ppc64le",
    "EM_S390": "s390x",
}
MUSL_ARCH = {
    "EM_X86_64": "x86_64",
    "EM_AARCH64": "aarch64",
    "EM_386": "i386",
    "EM_ARM": "armhf",
    "EM_RISCV": "riscv64",
    "EM_PPC64": "powerpc64le",
    "EM_S390": "s390x",
}


@dataclass(frozen=True)
class ElfInfo:
    elfclass: int  # 32 or 64
    machine: str  # e_machine, e.g. EM_X86_64
    etype: str  # ET_EXEC, ET_DYN, ...
    interp: str | None = None
    needed: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()
    undefined: frozenset[str] = field(default=frozenset(), compare=False)  # imported dynamic symbols

    @property
    def static(self) -> bool:
        return self.interp is None and not self.needed


def is_elf(tree: Tree, path: str) -> bool:
    node = tree.lookup(path, follow=True)
    if node is None or node.kind != FILE or node.size < 52:
        return False
    return _head(node, 4) == ELF_MAGIC


def _head(node, n: int) -> bytes:  # type: ignore[no-untyped-def]
    c = node.content
    if c is None:
        return b""
    if isinstance(c, bytes):
        return c[:n]
    import os

    with open(c.source, "rb") as f:
        return os.pread(f.fileno(), min(n, c.size), c.offset)


# The records read, per ELF class: header after e_ident, program header, section header, dynamic entry,
# symbol (the gABI's layouts; the byte order is prefixed per file).
_LAYOUT = {
    32: ("HHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII", "iI", "IIIBBH"),
    64: ("HHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ", "qQ", "IBBHQQ"),
}
# Where a program header's p_type, p_offset, p_paddr, p_filesz, p_memsz and p_align are, per class.
_PHDR_FIELDS = {32: (0, 1, 3, 4, 5, 7), 64: (0, 2, 4, 5, 6, 7)}
_PT_LOAD, _PT_INTERP, _PT_NOTE = 1, 3, 4
_SHT_DYNAMIC, _SHT_NOTE, _SHT_DYNSYM = 6, 7, 11
_DT_NEEDED, _DT_RPATH, _DT_RUNPATH = 1, 15, 29
_E_MACHINE = {v: k for k, v in ENUM_E_MACHINE.items() if isinstance(v, int)}
_E_TYPE = {v: k for k, v in ENUM_E_TYPE.items() if isinstance(v, int)}


@dataclass(frozen=True)
class Segment:
    """One program header: p_type, where its bytes are in the file, where it loads, its alignment."""

    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Section:
    """One section header: sh_type, where its bytes are in the file, its linked section, its alignment."""

    type: int
    offset: int
    size: int
    link: int
    align: int


class _Elf:
    """One ELF file read with bounds: the header at open, the tables on demand. Every offset and size a
    header gives is checked against the file's length before anything is allocated or read; anything
    malformed raises `error` naming `what`."""

    def __init__(self, stream: IO[bytes], what: str, error: type[XbuildError]):
        self.stream, self.what, self.error = stream, what, error
        self.size = stream.seek(0, io.SEEK_END)
        ident = self.read(0, 16) if self.size >= 16 else b""
        if ident[:4] != ELF_MAGIC:
            raise error(f"{what}: not an ELF file")
        elfclass = {1: 32, 2: 64}.get(ident[4])
        order = {1: "<", 2: ">"}.get(ident[5])
        if elfclass is None or order is None:
            raise error(f"{what}: malformed ELF file (class {ident[4]}, data {ident[5]})")
        self.elfclass, self.order = elfclass, order
        ehdr, self.phdr, self.shdr, self.dyn, self.sym = (struct.Struct(order + f) for f in _LAYOUT[elfclass])
        head = ehdr.unpack(self.read(16, ehdr.size))  # e_type, e_machine, ..., e_phoff, e_shoff, ...
        self.etype, self.machine, self.phoff, self.shoff = head[0], head[1], head[4], head[5]
        self.phentsize, self.phnum, self.shentsize, self.shnum = head[8:12]

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise self.error(f"{self.what}: malformed ELF file (a table lies outside the file)")
        self.stream.seek(offset)
        return self.stream.read(size)

    def records(
        self, layout: struct.Struct, offset: int, count: int, stride: int
    ) -> Iterator[tuple[int, ...]]:
        if count and stride < layout.size:
            raise self.error(f"{self.what}: malformed ELF file (entry size {stride})")
        table = self.read(offset, stride * count)
        for i in range(count):
            yield layout.unpack_from(table, i * stride)

    def segments(self) -> list[Segment]:
        at = _PHDR_FIELDS[self.elfclass]
        table = self.records(self.phdr, self.phoff, self.phnum, self.phentsize)
        return [Segment(*(p[i] for i in at)) for p in table]

    def sections(self) -> list[Section]:
        if not self.shoff:
            return []
        table = self.records(self.shdr, self.shoff, self.shnum, self.shentsize)
        return [Section(s[1], s[4], s[5], s[6], s[8]) for s in table]

    def notes(self, offset: int, size: int, align: int) -> Iterator[tuple[str, int, bytes]]:
        """(name, type, descriptor) of each note in the table at `offset`, `size` bytes long: namesz,
        descsz and type words, then the name and the descriptor, each starting at a multiple of `align`
        from the table's start (8 where the table is 8-aligned, else 4), as binutils reads them."""
        table, pad = self.read(offset, size), (8 if align == 8 else 4)
        head = struct.Struct(self.order + "III")
        at = 0
        while at + head.size <= len(table):
            namesz, descsz, ntype = head.unpack_from(table, at)
            name_at = at + head.size
            desc_at = -(-(name_at + namesz) // pad) * pad
            at = -(-(desc_at + descsz) // pad) * pad
            if desc_at + descsz > len(table):
                raise self.error(f"{self.what}: malformed ELF file (a note runs past its table)")
            name = table[name_at : name_at + namesz].rstrip(b"\0").decode("utf-8", "replace")
            yield name, ntype, table[desc_at : desc_at + descsz]


def _string(table: bytes, offset: int) -> str:
    """The NUL-terminated string at `offset` of a string table ('' outside it)."""
    if not 0 <= offset < len(table):
        return ""
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)].decode("utf-8", "replace")


def _stream(data: bytes | IO[bytes]) -> IO[bytes]:
    return io.BytesIO(data) if isinstance(data, bytes) else data


def loads(data: bytes | IO[bytes], what: str, error: type[XbuildError]) -> list[Segment]:
    """The PT_LOAD segments of an ELF image (bytes, or a seekable stream); `error` if it is not a readable
    ELF."""
    return [s for s in _Elf(_stream(data), what, error).segments() if s.type == _PT_LOAD]


def notes(data: bytes | IO[bytes], what: str, error: type[XbuildError]) -> Iterator[tuple[str, int, bytes]]:
    """(name, raw type, descriptor) of every note of an ELF image: those of its PT_NOTE segments, or, if it
    has none, of its SHT_NOTE sections (where a linker put notes the program headers do not list); `error`
    if it is not a readable ELF or a note runs past its table."""
    f = _Elf(_stream(data), what, error)
    tables = [(s.offset, s.filesz, s.align) for s in f.segments() if s.type == _PT_NOTE]
    tables = tables or [(s.offset, s.size, s.align) for s in f.sections() if s.type == _SHT_NOTE]
    for offset, size, align in tables:
        yield from f.notes(offset, size, align)


def parse(data: bytes | IO[bytes], what: str = "ELF file") -> ElfInfo:
    """The dynamic-linking facts of an ELF image (bytes, or a seekable stream read on demand): PT_INTERP from
    the program headers; DT_NEEDED, DT_RPATH and DT_RUNPATH from the SHT_DYNAMIC section (up to DT_NULL)
    with its linked string table; the undefined symbols of the SHT_DYNSYM section. MinimizeError if it is
    not a readable ELF. Read with `struct` at the gABI's record layouts, only the tables needed (pyelftools,
    used before, spent 2.2 CPU s on a JVM image's 313 objects, most of a big image's minimize)."""
    f = _Elf(_stream(data), what, MinimizeError)
    interp = None
    for p in f.segments():
        if p.type == _PT_INTERP:
            interp = _string(f.read(p.offset, p.filesz), 0)
    sections = f.sections()

    def table(index: int) -> bytes:  # a section's bytes, by index
        if index >= len(sections):
            raise MinimizeError(f"{what}: malformed ELF file (no section {index})")
        return f.read(sections[index].offset, sections[index].size)

    needed: list[str] = []
    rpath: list[str] = []
    runpath: list[str] = []
    undefined: set[str] = set()
    for s in sections:
        if s.type == _SHT_DYNAMIC:
            strings = table(s.link)
            for tag, value in f.dyn.iter_unpack(f.read(s.offset, s.size - s.size % f.dyn.size)):
                if tag == 0:  # DT_NULL ends the table
                    break
                if tag == _DT_NEEDED:
                    needed.append(_string(strings, value))
                elif tag == _DT_RPATH:
                    rpath += _string(strings, value).split(":")
                elif tag == _DT_RUNPATH:
                    runpath += _string(strings, value).split(":")
        elif s.type == _SHT_DYNSYM:
            strings = table(s.link)
            shndx = 3 if f.elfclass == 64 else 5
            for entry in f.sym.iter_unpack(f.read(s.offset, s.size - s.size % f.sym.size)):
                if entry[shndx] == 0 and (name := _string(strings, entry[0])):  # SHN_UNDEF
                    undefined.add(name)
    return ElfInfo(
        f.elfclass,
        _E_MACHINE.get(f.machine, str(f.machine)),
        _E_TYPE.get(f.etype, str(f.etype)),
        interp,
        tuple(needed),
        tuple(rpath),
        tuple(runpath),
        frozenset(undefined),
    )


def _dir_entries(tree: Tree, path: str) -> list[str]:
    node = tree.lookup(path, follow=True)
    if node is None or node.kind != DIR or not node.children:
        return []
    return sorted(node.children)


def glob(tree: Tree, pattern: str) -> list[str]:
    """Tree paths matching a shell glob (each component matched with fnmatch), sorted."""
    parts = split(pattern)
    found = [""]
    for i, part in enumerate(parts):
        nxt = []
        for base in found:
            if any(ch in part for ch in "*?["):
                names = [
                    n
                    for n in _dir_entries(tree, base)
                    if fnmatch.fnmatchcase(n, part) and (not n.startswith(".") or part.startswith("."))
                ]
            else:
                names = [part]
            for n in names:
                p = f"{base}/{n}" if base else n
                if i == len(parts) - 1 or tree.lookup(p, follow=True) is not None:
                    nxt.append(p)
        found = nxt
    return sorted(p for p in found if tree.lookup(p, follow=False) is not None)


def ld_so_conf(tree: Tree, path: str = "etc/ld.so.conf") -> list[str]:
    """Library directories named by ld.so.conf and the files it includes (globs allowed), in order.
    Each file is read once (include loops end there); includes nest to any depth (no recursion)."""
    seen: set[str] = set()

    def lines(files: list[str]) -> Iterator[tuple[str, str]]:
        for f in files:
            real = _safe_real(tree, f)
            if real is None or real in seen:
                continue
            seen.add(real)
            try:
                text = tree.read(f).decode("utf-8", "replace")
            except FileNotFoundError:
                continue
            base = f.rsplit("/", 1)[0] if "/" in f else ""
            for line in text.splitlines():
                yield base, line

    dirs: list[str] = []
    stack = [lines([path])]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        base, line = item
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "include":
            stack.append(
                lines(
                    [
                        inc
                        for pat in words[1:]
                        for inc in glob(tree, pat if pat.startswith("/") else f"{base}/{pat}")
                    ]
                )
            )
        elif words[0] != "hwcap":
            for d in line.replace(",", " ").replace(":", " ").split():
                if "=" in d:  # old libc5 "dir=TYPE" syntax
                    d = d.split("=", 1)[0]
                dirs.append("/".join(split(d)))
    return list(dict.fromkeys(dirs))


def _safe_real(tree: Tree, path: str) -> str | None:
    try:
        return tree.real_path(path)
    except LookupError:
        return None


@dataclass(frozen=True)
class Loaded:
    """One object of the closure: the path it was found under, and who asked for it."""

    path: str  # as searched (may be a symlink); tree path without leading '/'
    real: str  # symlinks resolved
    info: ElfInfo
    needed_by: str | None  # path of the object with the DT_NEEDED, None for roots
    name: str | None = None  # the DT_NEEDED / PT_INTERP string


class Resolver:
    """Resolves dependencies inside `tree`; `env` is the image's Env (for LD_LIBRARY_PATH)."""

    def __init__(self, tree: Tree, env: tuple[str, ...] = ()):
        self.tree = tree
        self.ld_library_path: list[str] = []
        for e in env:
            if e.startswith("LD_LIBRARY_PATH="):
                self.ld_library_path = [p for p in e.split("=", 1)[1].split(":") if p]
        self._conf: list[str] | None = None
        self._info: dict[str, ElfInfo | None] = {}
        self.malformed: dict[str, str] = {}  # real path -> why it is not a loadable ELF object

    def info(self, path: str) -> ElfInfo | None:
        """ElfInfo of the file at `path` (symlinks followed), None if it is not an ELF file or a
        malformed one (a candidate ld.so would skip; `malformed` says why)."""
        real = _safe_real(self.tree, path)
        if real is None:
            return None
        if real not in self._info:
            node = self.tree.lookup(real)
            self._info[real] = None
            if node is not None and node.kind == FILE and _head(node, 4) == ELF_MAGIC:
                try:
                    with open_content(node) as f:
                        self._info[real] = parse(f, f"/{real}")
                except MinimizeError as e:
                    self.malformed[real] = str(e)
        return self._info[real]

    def conf_dirs(self) -> list[str]:
        if self._conf is None:
            self._conf = ld_so_conf(self.tree)
        return self._conf

    def default_dirs(self, info: ElfInfo) -> list[str]:
        interp = (info.interp or "").rsplit("/", 1)[-1]
        if interp.startswith("ld-musl-"):
            arch = MUSL_ARCH.get(info.machine, "x86_64")
            path_file = f"etc/ld-musl-{arch}.path"
            try:
                text = self.tree.read(path_file).decode("utf-8", "replace")
                return ["/".join(split(d)) for d in text.replace("\n", ":").split(":") if d.strip()]
            except FileNotFoundError:
                return ["lib", "usr/local/lib", "usr/lib"]
        ma = MULTIARCH.get(info.machine)
        dirs = self.conf_dirs() + ([f"lib/{ma}", f"usr/lib/{ma}"] if ma else [])
        dirs += ["lib64", "usr/lib64"] if info.elfclass == 64 else ["lib32", "usr/lib32"]
        return list(dict.fromkeys(dirs + ["lib", "usr/lib"]))

    def expand(self, d: str, origin: str, info: ElfInfo) -> list[str]:
        """Tree directories for one RPATH/RUNPATH entry ($ORIGIN, $LIB, $PLATFORM substituted)."""
        if not d:
            return [origin]  # an empty entry means the current directory; the closest is the origin
        outs = [d]
        for var, values in (
            ("ORIGIN", ["/" + origin]),
            ("LIB", ["lib", "lib64", f"lib/{MULTIARCH.get(info.machine, '')}".rstrip("/")]),
            ("PLATFORM", [PLATFORM.get(info.machine, "x86_64")]),
        ):
            new = []
            for o in outs:
                if f"${var}" in o or f"${{{var}}}" in o:
                    for v in values:
                        new.append(o.replace(f"${{{var}}}", v).replace(f"${var}", v))
                else:
                    new.append(o)
            outs = new
        res = []
        for o in outs:
            real = _safe_real(self.tree, o)  # '..' after $ORIGIN must resolve through real dirs
            res.append(real if real is not None else "/".join(split(o)))
        return res

    def find(self, name: str, dirs: list[str], info: ElfInfo) -> str | None:
        for d in dirs:
            cand = f"{d}/{name}" if d else name
            node = self.tree.lookup(cand, follow=True)
            if node is None or node.kind != FILE:
                continue
            ci = self.info(cand)
            if ci is None or ci.elfclass != info.elfclass or ci.machine != info.machine:
                continue  # ld.so skips objects of the wrong class or machine
            return cand
        return None

    def closure(self, root: str, strict: bool = True) -> tuple[list[Loaded], list[str]]:
        """Every object `root` loads (itself first, then PT_INTERP, then DT_NEEDED breadth first).
        Returns (objects, missing); with `strict` a missing library is a MinimizeError."""
        info = self.info(root)
        real_root = _safe_real(self.tree, root) or root
        if info is None:
            if strict and real_root in self.malformed:
                raise MinimizeError(self.malformed[real_root])
            return [], []
        out = [Loaded(root, real_root, info, None)]
        missing: list[str] = []
        seen = {real_root}
        if info.interp:
            ip = "/".join(split(info.interp))
            ii = self.info(ip)
            if ii is None:
                msg = f"/{root} needs the program interpreter {info.interp}, which is not in the image"
                if strict:
                    raise MinimizeError(msg)
                missing.append(msg)
            else:
                r = _safe_real(self.tree, ip) or ip
                seen.add(r)
                out.append(Loaded(ip, r, ii, root, info.interp))
        # queue of (object path, its origin dir, its info, rpath chain of its loaders)
        exe_origin = real_root.rsplit("/", 1)[0] if "/" in real_root else ""
        queue: list[tuple[str, str, ElfInfo, list[tuple[str, ElfInfo, str]]]] = [(root, exe_origin, info, [])]
        while queue:
            path, origin, oinfo, chain = queue.pop(0)
            mine = (origin, oinfo, path)
            # an object with DT_RUNPATH ignores every DT_RPATH; otherwise its own and its loaders'
            # (whose DT_RPATH counts only if they have no DT_RUNPATH themselves)
            rpath_chain = [] if oinfo.runpath else [c for c in [mine] + chain if not c[1].runpath]
            for name in oinfo.needed:
                if "/" in name:
                    dirs: list[str] = [""]
                    name_path = "/".join(split(name))
                    found = self.find(name_path, dirs, oinfo)
                else:
                    dirs = []
                    for o, i, _p in rpath_chain:
                        for d in i.rpath:
                            dirs += self.expand(d, o, i)
                    dirs += ["/".join(split(d)) for d in self.ld_library_path]
                    for d in oinfo.runpath:
                        dirs += self.expand(d, origin, oinfo)
                    dirs += self.default_dirs(info)
                    found = self.find(name, list(dict.fromkeys(dirs)), oinfo)
                if found is None:
                    msg = (
                        f"/{path} needs the shared library {name}, which is not in the image "
                        f"(searched: {', '.join('/' + d for d in dict.fromkeys(dirs)) or 'nothing'})"
                    )
                    if strict:
                        raise MinimizeError(msg)
                    missing.append(msg)
                    continue
                real = _safe_real(self.tree, found) or found
                if real in seen:
                    continue
                seen.add(real)
                fi = self.info(found)
                assert fi is not None
                out.append(Loaded(found, real, fi, path, name))
                lib_origin = found.rsplit("/", 1)[0] if "/" in found else ""
                queue.append((found, lib_origin, fi, [mine] + chain))
        return out, missing


def symlink_chain(tree: Tree, path: str) -> list[str]:
    """Every symlink path met while resolving `path` inside the tree (directory links included),
    in order; the final real path is not included. Stops quietly at a loop."""
    links: list[str] = []
    with contextlib.suppress(LookupError):
        tree.real_path(path, links=links)
    return links
