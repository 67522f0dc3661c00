"""A strict reader of uncompressed tar streams: the layer tars and image archives xbuild reads.

It reads exactly what Go's archive/tar reader (under containerd, moby and umoci) reads, and refuses the
rest with a `TarFormatError` naming the byte offset, instead of guessing as Python's tarfile does (which
applies PAX global headers to later members, ends silently at a corrupt header, loops on a negative size
and recurses once per extension header):

- headers: V7, ustar (name = prefix/name), GNU (`L` long name, `K` long link), PAX `x` records (path,
  linkpath, size, uid, gid, mtime and the SCHILY.xattr./LIBARCHIVE.xattr. records kept for the member);
  a GNU long name wins over a PAX path, as in Go. PAX `g` global headers are skipped, as containerd and
  moby do ("ignored"), with whatever extension headers were pending before them.
- numbers: octal (spaces and NULs trimmed) or base-256; a negative or unparsable one is refused.
- checksum: the unsigned or the signed sum, as Go accepts.
- the end: EOF at a header boundary, or a zero block followed by EOF or a second zero block; a zero
  block followed by anything else, a partial block, or data running past the end is refused.
- member types: regular ('0', '\\0', and '\\0' with a trailing '/' is a directory), hardlink, symlink,
  char, block, directory, fifo. Sparse files (GNU 'S', PAX GNU.sparse.*), contiguous files ('7'),
  multi-volume and other GNU types, and unknown typeflags are refused: moby's extractor refuses every
  one of them too ("unhandled tar header type"), except PAX sparse, which Go expands and xbuild does not
  model (the content of a file is one byte range of the tar).
- PAX path/linkpath with a NUL byte are refused (Go's validPAXRecord); in a ustar field a name ends at
  its first NUL, as in every tar reader.

Each member is yielded as soon as its header is read; its data is never read, only its offset kept.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

BLOCK = 512
MAX_SPECIAL = 1 << 20  # a PAX or GNU long-name header's data, as Go's maxSpecialFileSize
REG, AREG, LINK, SYMLINK, CHAR, BLK, DIR, FIFO = b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6"
MEMBER_TYPES = (REG, LINK, SYMLINK, CHAR, BLK, DIR, FIFO)
HEADER_ONLY = (LINK, SYMLINK, CHAR, BLK, DIR, FIFO)  # their size field never counts (as in Go)
_TYPE_NAMES = {
    b"7": "contiguous file",
    b"S": "GNU sparse file",
    b"M": "GNU multi-volume continuation",
    b"V": "GNU volume header",
    b"N": "GNU old long name",
    b"D": "GNU dump directory",
    b"X": "Solaris extended header",
    b"A": "Solaris ACL",
    b"E": "Solaris extended attributes",
}
_PAX_RECORD = re.compile(rb"(\d+) ")
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"\d{1,19}")
_PAX_TIME = re.compile(r"-?\d+(?:\.\d+)?")


class TarFormatError(Exception):
    """The stream is not a tar xbuild reads exactly; the message names the offset and the reason."""


@dataclass(frozen=True)
class Member:
    """One member: its header fields and where its data is (`offset`, `size` bytes) in the stream."""

    name: str  # as in the tar, decoded like os.fsdecode (undecodable bytes kept)
    type: bytes  # one of MEMBER_TYPES
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int  # data bytes (0 for HEADER_ONLY types)
    offset: int  # of the data
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)  # PAX xattr records, raw values


def _bad(at: int, why: str) -> TarFormatError:
    return TarFormatError(f"corrupt tar: header at offset {at}: {why}")


def _fsdecode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _string(b: bytes) -> str:
    """A NUL-terminated header field."""
    return _fsdecode(b.split(b"\0", 1)[0])


def _number(b: bytes, what: str, at: int) -> int:
    """A numeric header field: base-256 (high bit set) or octal; negative values are refused."""
    if b and b[0] & 0x80:
        if b[0] == 0xFF:
            raise _bad(at, f"negative {what}")
        return int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
    s = b.strip(b" \0")
    if not s:
        return 0
    if not _OCTAL.fullmatch(s):
        raise _bad(at, f"{what} is not an octal number ({s[:16]!r})")
    return int(s, 8)


_HIGH = bytes(range(128, 256))


def _checksum_ok(blk: bytes, at: int) -> bool:
    """The stored checksum is the unsigned or (old tars) the signed byte sum, the field itself as spaces."""
    stored = _number(blk[148:156], "checksum", at)
    unsigned = sum(blk[:148]) + 8 * 32 + sum(blk[156:])
    if stored == unsigned:
        return True
    high = 512 - 8 - len(blk[:148].translate(None, _HIGH)) - len(blk[156:].translate(None, _HIGH))
    return stored == unsigned - 256 * high


def _pax_records(data: bytes, at: int) -> dict[str, bytes]:
    """`LEN KEY=VALUE\\n` records; later ones replace earlier ones."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        m = _PAX_RECORD.match(data, pos)
        length = int(m.group(1)) if m else 0
        end = pos + length
        if not m or length < 5 or end > len(data) or data[end - 1] != 0x0A:
            raise _bad(at, f"malformed PAX record at byte {pos}")
        key, eq, value = data[m.end() : end - 1].partition(b"=")
        if not eq or not key or b"\0" in key:
            raise _bad(at, f"malformed PAX record at byte {pos}")
        k = _fsdecode(key)
        if k in ("path", "linkpath", "uname", "gname") and b"\0" in value:
            raise _bad(at, f"PAX record: {k} contains a NUL byte")
        out[k] = value
        pos = end
    return out


def _xattrs(pax: dict[str, bytes], at: int) -> dict[str, bytes]:
    """SCHILY.xattr.NAME (raw value) and LIBARCHIVE.xattr.NAME (base64 value) records."""
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                out[key[len("LIBARCHIVE.xattr.") :]] = base64.b64decode(value + b"==", validate=False)
            except binascii.Error:
                raise _bad(at, f"PAX record {key} is not base64") from None
    return out


def _pax_int(records: dict[str, bytes], key: str, at: int) -> int | None:
    v = records.get(key)
    if v is None:
        return None
    if not _DECIMAL.fullmatch(v):
        raise _bad(at, f"PAX record {key}={v[:32]!r} is not a non-negative number")
    return int(v)


def read_members(f: BinaryIO, total: int) -> Iterator[Member]:
    """Every member of the seekable tar stream `f` (at its start, `total` bytes long), in order."""
    pos = 0
    pax: dict[str, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None

    def read(n: int, what: str) -> bytes:
        nonlocal pos
        data = f.read(n)
        if len(data) != n:
            raise TarFormatError(f"truncated tar: {what} at offset {pos} runs past the end")
        pos += n
        return data

    while True:
        at = pos
        blk = f.read(BLOCK)
        if not blk and not (pax or long_name is not None or long_link is not None):
            return  # EOF at a header boundary: Go accepts it
        if len(blk) != BLOCK:
            raise TarFormatError(f"truncated tar: header at offset {at} runs past the end")
        pos += BLOCK
        if blk == bytes(BLOCK):
            nxt = f.read(BLOCK)
            if nxt and nxt != bytes(BLOCK):
                raise TarFormatError(f"corrupt tar: a zero block at offset {at} is followed by data")
            if pax or long_name is not None or long_link is not None:
                raise TarFormatError(f"corrupt tar: extension header before offset {at} has no member")
            return
        if not _checksum_ok(blk, at):
            raise TarFormatError(f"corrupt tar: bad header checksum at offset {at}")
        typ = blk[156:157]
        hsize = _number(blk[124:136], "size", at)
        if typ in (b"x", b"g", b"L", b"K"):
            if hsize > MAX_SPECIAL:
                raise _bad(at, f"extension header of {hsize} bytes")
            data = read(hsize, "extension header")
            read(-hsize % BLOCK, "padding")
            if typ == b"x":
                pax.update(_pax_records(data, at))
            elif typ == b"g":
                _pax_records(data, at)  # checked, then ignored like containerd does
                pax, long_name, long_link = {}, None, None
            elif typ == b"L":
                long_name = data.split(b"\0", 1)[0]
            else:
                long_link = data.split(b"\0", 1)[0]
            continue
        ustar = blk[257:263] == b"ustar\0"
        name_b = blk[0:100].split(b"\0", 1)[0]
        if ustar and blk[345] != 0:
            name_b = blk[345:500].split(b"\0", 1)[0] + b"/" + name_b
        name = _fsdecode(pax["path"]) if "path" in pax else _fsdecode(name_b)
        if long_name is not None:
            name = _fsdecode(long_name)
        linkname = _fsdecode(pax["linkpath"]) if "linkpath" in pax else _string(blk[157:257])
        if long_link is not None:
            linkname = _fsdecode(long_link)
        if typ == AREG:
            typ = DIR if name.endswith("/") else REG
        if typ == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
            raise TarFormatError(f"member {name!r} at offset {at}: sparse files are not supported")
        if typ not in MEMBER_TYPES:
            what = _TYPE_NAMES.get(typ, f"unknown type {typ!r}")
            raise TarFormatError(f"member {name!r} at offset {at}: unsupported tar member type ({what})")
        psize = _pax_int(pax, "size", at)
        size = hsize if psize is None else psize
        uid = _pax_int(pax, "uid", at)
        gid = _pax_int(pax, "gid", at)
        mtime = _number(blk[136:148], "mtime", at)
        if "mtime" in pax:
            t = _fsdecode(pax["mtime"])
            if not _PAX_TIME.fullmatch(t) or len(t) > 40:
                raise _bad(at, f"PAX record mtime={t[:32]!r} is not a time")
            mtime = int(t.split(".", 1)[0])
        data_size = 0 if typ in HEADER_ONLY else size
        end = pos + data_size + (-data_size % BLOCK)
        if end > total:
            raise TarFormatError(f"member {name!r} at offset {at}: truncated tar (content runs past the end)")
        yield Member(
            name=name,
            type=typ,
            mode=_number(blk[100:108], "mode", at),
            uid=_number(blk[108:116], "uid", at) if uid is None else uid,
            gid=_number(blk[116:124], "gid", at) if gid is None else gid,
            mtime=mtime,
            size=data_size,
            offset=pos,
            linkname=linkname,
            devmajor=_number(blk[329:337], "devmajor", at) if ustar or blk[257:263] == b"ustar " else 0,
            devminor=_number(blk[337:345], "devminor", at) if ustar or blk[257:263] == b"ustar " else 0,
            xattrs=_xattrs(pax, at),
        )
        f.seek(end)
        pos = end
        pax, long_name, long_link = {}, None, None
