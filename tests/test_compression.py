"""The codec table (builder.compression) and the one tree walk (builder.tree.entries, ContentReader).

Compressed data comes from the real tools (gzip, xz, lzma, bzip2, zstd, lz4 -l), and what xbuild writes is
read back by them: the table must detect each by its magic, decompress it, and round-trip what it writes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from builder.compression import (
    CODECS,
    COMPRESSIONS,
    LAYER_CODECS,
    ZSTD,
    ZSTD_DEFAULT_LEVEL,
    ZSTD_MEMORY,
    ZSTD_THREADS,
    ZSTD_WINDOW_LOG_MAX,
    ZSTD_WINDOW_LOG_SMALL,
    CorruptData,
    compressor,
    decompress,
    reader,
    sniff,
    zstd_parameters,
)
from builder.cpio import pack
from builder.disk import _write_tar
from builder.errors import CacheError, PackError
from builder.tree import FILE, SYMLINK, Content, ContentReader, Inode, Tree, entries, regular

DATA = b"".join(b"line %d of some text that compresses\n" % i for i in range(30_000))  # 1 MB
BIG = DATA * 9  # 2 lz4 blocks
TOOLS = {
    "gzip": ["gzip", "-c"],
    "xz": ["xz", "-c"],
    "lzma": ["lzma", "-c"],
    "bzip2": ["bzip2", "-c"],
    "zstd": ["zstd", "-q", "-c"],
    "lz4": ["lz4", "-l", "-c"],
}
UNTOOLS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-q", "-dc"], "lz4": ["lz4", "-dc"]}


def tool(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_the_table_detects_and_decompresses_what_the_tools_write(name: str) -> None:
    made = tool(TOOLS[name], DATA)
    assert sniff(made) == name
    assert decompress(name, made + b"\x01\x02\x03\x04") == DATA  # trailing bytes (a bzImage's size) ignored


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_corrupt_data_is_one_error_for_every_codec(name: str) -> None:
    made = bytearray(tool(TOOLS[name], DATA))
    start = 8 if name == "lz4" else len(made) // 3  # lz4: a block's first sequences (literals go unchecked)
    for i in range(start, start + 64):
        made[i] ^= 0x5A
    with pytest.raises(CorruptData):
        decompress(name, bytes(made))


def test_a_layer_is_gzip_zstd_or_a_tar_whatever_its_first_name_spells() -> None:
    assert LAYER_CODECS == ("gzip", "zstd")
    assert sniff(b"BZh91AY&SY", LAYER_CODECS) == "none"  # a tar whose first member is named BZh...
    assert sniff(b"]\x00\x00\x80", LAYER_CODECS) == "none"
    assert sniff(b"BZh91AY&SY") == "bzip2"
    assert sniff(b"plain text") == "none" and sniff(b"") == "none"


@pytest.mark.parametrize("name", COMPRESSIONS)
@pytest.mark.parametrize("level", [None, "min", "max"])
def test_every_written_codec_round_trips_and_is_reproducible(name: str, level: str | None) -> None:
    codec = CODECS[name]
    lvl = None if level is None else codec.levels[0] if level == "min" else codec.levels[-1]
    data = BIG if name == "lz4" and level is None else DATA[:100_000] if level == "max" else DATA
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        sink = compressor(name, buf, lvl)
        for i in range(0, len(data), 1 << 20):
            sink.write(data[i : i + (1 << 20)])
        sink.close()
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    made = outs[0]
    assert sniff(made) == name
    assert decompress(name, made) == data
    if name in UNTOOLS:
        assert tool(UNTOOLS[name], made) == data
    if codec.stream is not None:
        with reader(name, io.BytesIO(made)) as r:
            assert r.read(len(data) + 1) == data and r.read(10) == b""


def test_levels_outside_a_codecs_range_are_refused(tmp_path: Path) -> None:
    assert CODECS["gzip"].level(None) == 3 and CODECS["zstd"].level(None) == ZSTD_DEFAULT_LEVEL
    for name, bad in (("gzip", 6), ("gzip", -1), ("lz4", 13), ("zstd", 23), ("none", 1)):
        with pytest.raises(ValueError, match=f"{name} levels are"):
            CODECS[name].level(bad)
        with pytest.raises(PackError, match=f"{name} levels are"):
            pack(Tree(), tmp_path / "initrd", name, bad)
    assert not (tmp_path / "initrd").exists()


def test_the_streamed_reader_reads_every_frame_in_full_blocks() -> None:
    frames = tool(TOOLS["zstd"], BIG[:3_000_001]) + tool(TOOLS["zstd"], BIG[3_000_001:])
    with reader("zstd", io.BytesIO(frames)) as r:
        blocks = iter(lambda: r.read(1 << 20), b"")
        got = list(blocks)
    assert b"".join(got) == BIG and all(len(b) == 1 << 20 for b in got[:-1])
    members = tool(TOOLS["gzip"], DATA[:5]) + tool(TOOLS["gzip"], DATA[5:])
    assert reader("gzip", io.BytesIO(members)).read(len(DATA)) == DATA
    with pytest.raises(CorruptData):
        reader("gzip", io.BytesIO(members[:-100])).read(len(DATA))
    with pytest.raises(CorruptData):
        reader("zstd", io.BytesIO(b"\x28\xb5\x2f\xfd" + b"junk" * 100)).read(100)


# ---------------------------------------------------------------------------------------- the tree walk


def linked_tree(source: Path) -> tuple[Tree, Inode]:
    source.write_bytes(b"x" * 100 + b"content!" * 1000)
    t = Tree()
    shared = Inode(FILE, 0o644, mtime=2_000, size=8000, content=Content(str(source), 100, 8000))
    for path in ("b/two", "a/one", "c/three"):
        t.add(path, shared)
    link = Inode(SYMLINK, 0o777, mtime=5, target="a/one")
    t.add("s1", link)
    t.add("s2", link)
    t.add("d/small", regular(b"small", mtime=50))
    return t, shared


def test_entries_number_inodes_group_hardlinks_and_clamp_mtimes(tmp_path: Path) -> None:
    tree, shared = linked_tree(tmp_path / "layer.tar")
    walked = entries(tree, epoch=1_000)
    by_path = {e.path: e for e in walked}
    assert [e.path for e in walked] == [p for p, _ in tree.walk()]
    group = [by_path[p] for p in ("a/one", "b/two", "c/three")]
    assert {e.ino for e in group} == {group[0].ino} and all(e.links == 3 for e in group)
    assert [e.is_leader for e in group] == [True, False, False] and {e.leader for e in group} == {"a/one"}
    assert [e.last for e in group] == [False, False, True]
    assert all(e.mtime == 1_000 for e in group) and by_path["d/small"].mtime == 50
    assert by_path["s2"].leader == "s1" and by_path["s2"].ino == by_path["s1"].ino
    assert by_path[""].ino == 1 and by_path[""].links == 1
    assert len({e.ino for e in walked}) == len({id(e.node) for e in walked})
    assert entries(tree)[1].mtime == next(n for p, n in tree.walk() if p == "a").mtime


def test_a_layer_that_ends_early_is_a_cache_error_for_every_writer(tmp_path: Path) -> None:
    """The cache changed under a writer: the cpio writer and the disk's tar say so the same way."""
    tree, _ = linked_tree(tmp_path / "layer.tar")
    node = tree.lookup("a/one")
    assert node is not None
    with ContentReader() as contents:
        assert b"".join(contents.chunks(node)) == b"content!" * 1000
        assert contents.open(node).read() == b"content!" * 1000
    os.truncate(tmp_path / "layer.tar", 4000)
    with pytest.raises(CacheError, match="layer.tar: content ends early"):
        pack(tree, tmp_path / "initrd", "none")
    with pytest.raises(CacheError, match="layer.tar: content ends early"):
        _write_tar(tree, tmp_path / "tree.tar", None, None)


def test_zstd_parameters_fit_the_memory_bound_and_the_guest_window_at_every_level() -> None:
    """Every level's plan is within ZSTD_MEMORY and ZSTD_WINDOW_LOG_MAX, and only the thread count depends
    on the machine (so the bytes do not)."""
    shape = ("window_log", "chain_log", "hash_log", "search_log", "min_match", "target_length", "strategy")
    for level in range(-5, ZSTD.levels.stop):
        plans = [zstd_parameters(level, cpus=cpus) for cpus in (1, 2, 64)]
        for plan in plans:
            assert plan.memory <= ZSTD_MEMORY, (level, plan)
            assert plan.window <= 1 << ZSTD_WINDOW_LOG_MAX, (level, plan)
            assert 1 <= plan.params.threads <= ZSTD_THREADS
        assert len({tuple(getattr(p.params, k) for k in (*shape, "job_size")) for p in plans}) == 1, level
    assert zstd_parameters(19).window == zstd_parameters(22).window == 8 << 20  # the guest's bound
    assert ZSTD.default_level == ZSTD_DEFAULT_LEVEL


def test_an_initrd_s_zstd_window_fits_its_archive(tmp_path: Path) -> None:
    """`pack` tells zstd the archive's length in advance (`archive_size`, computed without reading a file):
    a tree smaller than the level's window gets a window of its own size, recorded in the frame (what the
    guest's unzstd allocates); a larger one the level's window; the bytes are a function of (level, tree)."""
    from builder.cpio import archive_size

    level, small = ZSTD_DEFAULT_LEVEL, 1 << ZSTD_WINDOW_LOG_SMALL
    assert zstd_parameters(level, size=100 << 10).window == 128 << 10  # a power of two >= it
    assert zstd_parameters(level, size=12 << 20).window == small  # 1/64 of it is less: the floor
    assert zstd_parameters(level, size=64 << 20).window == 1 << 20  # 1/64 of it
    assert zstd_parameters(level, size=65 << 20).window == 2 << 20  # the power of two above 1/64 of it
    assert zstd_parameters(level, size=1 << 30).window == zstd_parameters(level).window == 4 << 20
    assert zstd_parameters(19, size=1 << 30).window == 8 << 20
    assert zstd_parameters(19, size=12 << 20).window == 8 << 20  # size-first levels keep their window
    assert zstd_parameters(10, size=12 << 20).window == zstd_parameters(10).window
    for n, window in ((3000, None), (100_000, None), (2 << 20, small)):
        tree = Tree()
        tree.add("a/f", regular((DATA * 8)[:n] + os.urandom(n // 4), 0o644))
        tree.add("a/g", tree.lookup("a/f"))  # a hardlink: the data once
        tree.add("a/l", Inode(SYMLINK, 0o777, target="x" * 201))
        size = archive_size(tree, last="a/g")
        packed = [pack(tree, tmp_path / f"i{k}", "zstd", last="a/g") for k in range(2)]
        assert packed[0].sha256 == packed[1].sha256 and packed[0].uncompressed_size == size
        frame = zstandard.get_frame_parameters((tmp_path / "i0").read_bytes()[:18])
        assert frame.content_size == size
        assert frame.window_size == (window or size), (n, frame.window_size)
        assert len(zstandard.ZstdDecompressor().decompress((tmp_path / "i0").read_bytes())) == size


@pytest.mark.parametrize("level", [3, ZSTD_DEFAULT_LEVEL, 19])
def test_zstd_output_does_not_depend_on_the_thread_count(level: int) -> None:
    data = b"".join(os.urandom(1 << 16) + DATA[: 1 << 18] for _ in range(12))  # 3.8 MB, several jobs
    outs = set()
    for cpus in (1, 2, 4):
        params = zstd_parameters(level, cpus=cpus).params
        outs.add(zstandard.ZstdCompressor(compression_params=params).compress(data))
    assert len(outs) == 1


VMHWM_CHILD = r"""
import random, sys
from pathlib import Path
from builder.cpio import pack
from builder.tree import Content, Inode, Tree, directory, FILE
src, total, level = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng, text = random.Random(0), b"".join(b"row %d of a compressible file\n" % i for i in range(40_000))
tree, offset = Tree(directory()), 0
with open(src, "wb") as f:  # 4 MiB files: a random one for every three compressible ones
    while offset < total:
        size = 4 << 20
        f.write(rng.randbytes(size) if offset // size % 4 == 0 else (text * 4)[:size])
        node = Inode(FILE, 0o644, size=size, content=Content(str(src), offset, size))
        tree.add(f"data/f{offset // size:05d}", node)
        offset += size
pack(tree, src.with_suffix(".img"), "zstd", level)
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(int(hwm.split()[1]) // 1024, src.with_suffix(".img").stat().st_size)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("total_mb", "level"), [(1024, None), (96, 19), (96, 22)])
def test_packing_a_big_tree_stays_under_150_mb(tmp_path: Path, total_mb: int, level: int | None) -> None:
    """Peak RSS (the child's own VmHWM, not ru_maxrss) of packing a 1 GiB tree at the default level, and
    96 MiB (several jobs: zstd's buffers are at their peak) at the size-first levels, is < 150 MB."""
    lvl = ZSTD_DEFAULT_LEVEL if level is None else level
    r = subprocess.run(
        [sys.executable, "-c", VMHWM_CHILD, str(tmp_path / "src"), str(total_mb << 20), str(lvl)],
        capture_output=True,
        text=True,
        timeout=3600,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mb, size = map(int, r.stdout.split())
    assert peak_mb < 150, (peak_mb, total_mb, lvl)
    assert 0 < size < total_mb << 20
