"""Kernel stage: fragment checks, Xen note checks, cache keys (fast); build, verify and boot (slow)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import lzma
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import lz4.block
import pytest

from builder import kernel as kern
from builder.errors import KernelError

XEN_ENTRY, XEN_GUEST_OS, XEN_HYPERCALL_PAGE, XEN_PHYS32_ENTRY = 1, 6, 2, 18


# ---------------------------------------------------------------------------------------------- fragments

KCONFIG = """\
config NET
	bool "Networking"

menuconfig NETDEVICES
	bool "Network devices"
	depends on NET

if NETDEVICES
config NET_CORE
	bool "Core"

if NET_CORE
config VIRTIO_NET
	bool "Virtio net"
	depends on VIRTIO && PCI
	help
\t  if you say Y here this is help text, not a block:
\t  config NOT_A_SYMBOL
endif # NET_CORE
endif # NETDEVICES

source "drivers/Kconfig"
"""

DRIVERS_KCONFIG = """\
config SERIAL_8250_PNP
	bool "8250 PNP" if EXPERT
	depends on SERIAL_8250 && PNP
"""


@pytest.fixture
def kconfig_tree(tmp_path: Path) -> Path:
    (tmp_path / "Kconfig").write_text(KCONFIG)
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers/Kconfig").write_text(DRIVERS_KCONFIG)
    return tmp_path


def test_parse_config() -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=64\n# comment\n'
    assert kern.parse_config(text) == {"A": "y", "B": "n", "C": '"x y"', "D": "64"}


def test_check_fragments_names_dropped_symbol_and_unmet_dependency(kconfig_tree: Path) -> None:
    fragment = "CONFIG_VIRTIO_NET=y\nCONFIG_NETDEVICES=y\n# CONFIG_PCI is not set\nCONFIG_NO_SUCH=y\n"
    final = "CONFIG_NET=y\nCONFIG_NETDEVICES=y\n# CONFIG_NET_CORE is not set\nCONFIG_VIRTIO=y\n"
    dropped = {d.symbol: d for d in kern.check_fragments({"qemu": fragment}, final, kconfig_tree)}
    assert set(dropped) == {"VIRTIO_NET", "NO_SUCH"}
    virtio = dropped["VIRTIO_NET"]
    assert (virtio.wanted, virtio.got, virtio.fragment) == ("y", "n", "qemu")
    assert virtio.unmet == ("depends on NET_CORE [NET_CORE=n]", "depends on VIRTIO && PCI [VIRTIO=y PCI=n]")
    assert "CONFIG_VIRTIO_NET=y (qemu) became n: depends on NET_CORE" in str(virtio)
    assert dropped["NO_SUCH"].unmet == ("no such symbol in this kernel's Kconfig",)


def test_check_fragments_prompt_condition_and_values(kconfig_tree: Path) -> None:
    fragment = "CONFIG_SERIAL_8250_PNP=y\nCONFIG_NR_CPUS=64\n"
    final = "CONFIG_SERIAL_8250=y\nCONFIG_PNP=y\nCONFIG_NR_CPUS=8\n"
    dropped = kern.check_fragments({"qemu": fragment}, final, kconfig_tree)
    assert [(d.symbol, d.got) for d in dropped] == [("SERIAL_8250_PNP", "n"), ("NR_CPUS", "8")]
    assert dropped[0].unmet == ("depends on EXPERT [EXPERT=n]",)


def test_check_fragments_names_disagreeing_fragments() -> None:
    frags = {"base": "CONFIG_A=y\n", "extra": "# CONFIG_A is not set\n"}
    [dropped] = kern.check_fragments(frags, "# CONFIG_A is not set\n")
    assert (dropped.fragment, dropped.unmet) == ("base", ("fragment extra sets it to n",))


def test_check_fragments_all_kept() -> None:
    assert kern.check_fragments({"base": "CONFIG_A=y\n# CONFIG_B is not set\n"}, "CONFIG_A=y\n") == []


def test_an_arch_fragment_overrides_a_shared_one() -> None:
    """arm64's `arch` unsets base's (x86) KERNEL_LZ4: its value is what is checked; any other disagreement
    is still named."""
    frags = {"base": "CONFIG_A=y\nCONFIG_B=y\n", "arch": "# CONFIG_A is not set\n"}
    assert kern.check_fragments(frags, "CONFIG_B=y\n", overriding=("arch",)) == []
    [kept_wrong] = kern.check_fragments(frags, "CONFIG_A=y\nCONFIG_B=y\n", overriding=("arch",))
    assert (kept_wrong.symbol, kept_wrong.fragment, kept_wrong.got) == ("A", "arch", "y")
    # an override only counts from a later fragment
    frags = {"arch": "# CONFIG_A is not set\n", "base": "CONFIG_A=y\n"}
    [clash] = kern.check_fragments(frags, "", overriding=("arch",))
    assert (clash.fragment, clash.unmet) == ("base", ("fragment arch sets it to n",))


def test_arm64_fragments() -> None:
    """A fragment name means the arch's own file where it has one, else the shared one; only the own
    ones override; base's x86 bzImage compression is what arm64's `arch` unsets."""
    arm = kern.ARCHES["arm64"]
    paths = {n: kern.fragment_path(n, "arm64") for n in arm.fragments}
    assert paths["xen"] == kern.KERNELS_DIR / "arm64/xen.config"
    assert paths["net"] == kern.KERNELS_DIR / "net.config" == kern.fragment_path("net")
    assert kern.fragment_path("xen") == kern.KERNELS_DIR / "xen.config"
    assert kern.arch_fragments(arm.fragments, "arm64") == ("arch", "xen", "qemu")
    assert kern.arch_fragments(kern.DEFAULT_FRAGMENTS, "amd64") == ()
    own = kern.parse_config(paths["arch"].read_text())
    assert kern.parse_config(paths["base"].read_text())["KERNEL_LZ4"] == "y" and own["KERNEL_LZ4"] == "n"
    assert own["IKCONFIG"] == "y"  # verify() reads Xen support from it
    xen = kern.parse_config(paths["xen"].read_text())
    assert {"XEN", "HVC_XEN", "XEN_NETDEV_FRONTEND", "XEN_BLKDEV_FRONTEND"} <= {
        k for k, v in xen.items() if v == "y"
    }
    qemu = kern.parse_config(paths["qemu"].read_text())
    assert {
        "SERIAL_AMBA_PL011_CONSOLE",
        "VIRTIO_MMIO",
        "VIRTIO_PCI",
        "PCI_HOST_GENERIC",
        "VIRTIO_NET",
    } <= set(qemu)
    with pytest.raises(KernelError, match="no kernel fragment 'arch' for amd64"):
        kern.fragment_path("arch")
    with pytest.raises(KernelError, match=r"no kernel for architecture 'riscv64' \(known: amd64, arm64\)"):
        kern.build_key(arch="riscv64")
    assert "no_timer_check" in kern.cmdline() and "no_timer_check" not in kern.cmdline("arm64")


def test_default_fragments_exist() -> None:
    for name in kern.DEFAULT_FRAGMENTS:
        assert kern.parse_config(kern.fragment_path(name).read_text())
    with pytest.raises(KernelError, match="no kernel fragment 'nope'"):
        kern.fragment_path("nope")


def test_cmdline_has_no_comments() -> None:
    line = kern.cmdline()
    assert line and "#" not in line


# ---------------------------------------------------------------------------------------------- notes


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _note(n_type: int, desc: bytes, name: bytes = b"Xen\0") -> bytes:
    return struct.pack("<III", len(name), len(desc), n_type) + _pad(name) + _pad(desc)


def _elf(notes: bytes) -> bytes:
    """A minimal ELF64 x86-64 executable whose only program header is a PT_NOTE over `notes`."""
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF",
        2,
        1,
        1,
        0,
        0,
        b"",
        2,
        62,
        1,
        0x1000000,
        64,
        0,
        0,
        64,
        56,
        1,
        0,
        0,
        0,
    )
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(notes), len(notes), 4)
    return ehdr + phdr + notes


ALL_NOTES = (
    _note(XEN_GUEST_OS, b"linux\0")
    + _note(XEN_ENTRY, struct.pack("<Q", 0xFFFFFFFF81000000))
    + _note(XEN_PHYS32_ENTRY, struct.pack("<I", 0x1000200))
    + _note(XEN_HYPERCALL_PAGE, b"x", name=b"GNU\0")
)


def test_verify_all_notes(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf(ALL_NOTES))
    info = kern.verify(path)
    assert (info.fmt, info.modes) == ("elf", ("pv", "pvh", "qemu"))
    assert (info.entry, info.phys32_entry) == (0xFFFFFFFF81000000, 0x1000200)


def test_verify_missing_pvh_entry(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf(_note(XEN_GUEST_OS, b"linux\0") + _note(XEN_ENTRY, struct.pack("<Q", 1))))
    with pytest.raises(
        KernelError, match=r"no Xen PVH entry \(XEN_ELFNOTE_PHYS32_ENTRY\); build with CONFIG_XEN_PVH"
    ):
        kern.verify(path)
    assert kern.verify(path, require=("pv",)).modes == ("pv",)


def test_verify_not_xen(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf(_note(3, b"build-id", name=b"GNU\0")))  # NT_GNU_BUILD_ID
    with pytest.raises(KernelError, match="no Xen PV entry.*no Xen PVH entry"):
        kern.verify(path)
    path.write_bytes(b"not a kernel at all" * 100)
    with pytest.raises(KernelError, match="neither an ELF file nor a bzImage"):
        kern.verify(path)


def test_verify_refuses_notes_that_run_past_their_table(tmp_path: Path) -> None:
    """A note claiming a name longer than its PT_NOTE table, and a program header table past the end of the
    file: KernelError naming the kernel, never another exception."""
    path = tmp_path / "vmlinux"
    path.write_bytes(_elf(struct.pack("<III", 4000, 0, XEN_ENTRY) + b"Xen\0"))
    with pytest.raises(KernelError, match=f"kernel {path}: malformed ELF file .a note runs past"):
        kern.verify(path)
    image = bytearray(_elf(ALL_NOTES))
    struct.pack_into("<Q", image, 0x20, 1 << 20)  # e_phoff
    path.write_bytes(image)
    with pytest.raises(KernelError, match="malformed ELF file .a table lies outside the file"):
        kern.verify(path)


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 1
    head = bytearray(1024)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(payload))
    return bytes(head) + b"\0" * 16 + payload + b"\0" * 64


def _lz4_legacy(data: bytes) -> bytes:
    out = b"\x02\x21\x4c\x18"
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i : i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out + struct.pack("<I", len(data))  # the kernel appends the uncompressed size


@pytest.mark.parametrize("compress", [lambda d: gzip.compress(d) + struct.pack("<I", len(d)), _lz4_legacy])
def test_verify_bzimage_payload(tmp_path: Path, compress) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(_bzimage(compress(_elf(ALL_NOTES))))
    info = kern.verify(path)
    assert (info.fmt, info.modes) == ("bzimage", ("pv", "pvh", "qemu"))


def test_vmlinux_from_an_xz_bzimage() -> None:
    """The one bzImage unpacker (the nested rig unpacks dom0's vmlinuz with it): ELF as is, payload out."""
    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert kern.vmlinux(Path("bz"), _bzimage(payload)) == elf
    assert kern.vmlinux(Path("elf"), elf) == elf
    with pytest.raises(KernelError, match="neither an ELF file nor a bzImage"):
        kern.vmlinux(Path("zeros"), b"\0" * 4096)
    with pytest.raises(KernelError, match="not an ELF vmlinux"):
        kern.vmlinux(Path("bz"), _bzimage(gzip.compress(b"no elf here")))


def _arm64_image(config: str | None, size: int = 1 << 16) -> bytes:
    """An arm64 Image: the 64-byte header (magic at 0x38) and, if `config`, an IKCONFIG block in its body."""
    head = struct.pack("<II6Q4sI", 0x14000010, 0, 0, size, 0xA, 0, 0, 0, b"ARM\x64", 0)
    body = b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED" if config is not None else b""
    return head + body + bytes(size - len(head) - len(body))


def test_verify_arm64_image(tmp_path: Path) -> None:
    """An arm64 Image boots under QEMU; as a Xen guest only with CONFIG_XEN and HVC_XEN in its .config
    (embedded, or beside it as Debian's /boot has it); a gzip'd Image is read too; others are refused."""
    path = tmp_path / "Image"
    path.write_bytes(_arm64_image("CONFIG_XEN=y\nCONFIG_HVC_XEN=y\n"))
    info = kern.verify(path, arch="arm64")
    assert (info.fmt, info.modes, info.entry) == ("image", ("xen", "qemu"), None)
    path.write_bytes(gzip.compress(_arm64_image("CONFIG_XEN=y\nCONFIG_HVC_XEN=y\n")))
    assert kern.verify(path, arch="arm64").modes == ("xen", "qemu")
    path.write_bytes(_arm64_image("CONFIG_XEN=y\n# CONFIG_HVC_XEN is not set\n"))
    with pytest.raises(KernelError, match=r"no Xen guest support \(CONFIG_XEN and CONFIG_HVC_XEN\)"):
        kern.verify(path, arch="arm64")
    assert kern.verify(path, require=("qemu",), arch="arm64").modes == ("qemu",)
    debian = tmp_path / "vmlinuz-6.1.0-1-cloud-arm64"
    debian.write_bytes(_arm64_image(None))
    with pytest.raises(KernelError, match="cannot tell its Xen guest support: no .config in it"):
        kern.verify(debian, arch="arm64")
    (tmp_path / "config-6.1.0-1-cloud-arm64").write_text("CONFIG_XEN=y\nCONFIG_HVC_XEN=y\n")
    assert kern.verify(debian, arch="arm64").modes == ("xen", "qemu")
    path.write_bytes(_elf(ALL_NOTES))  # an amd64 kernel where an arm64 one is expected
    with pytest.raises(KernelError, match="not an arm64 Image"):
        kern.verify(path, arch="arm64")


def test_verify_bzimage_without_pvh(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    elf = _elf(_note(XEN_GUEST_OS, b"linux\0") + _note(XEN_ENTRY, struct.pack("<Q", 1)))
    path.write_bytes(_bzimage(gzip.compress(elf)))
    with pytest.raises(KernelError, match=f"kernel {path}: no Xen PVH entry"):
        kern.verify(path)


# ---------------------------------------------------------------------------------------------- cache key


def test_cache_key_stable_and_sensitive(tmp_path: Path) -> None:
    src = tmp_path / "linux.tar.xz"
    src.write_bytes(b"source bytes")
    frags = {"base": "CONFIG_A=y\n", "xen": "CONFIG_XEN=y\n"}
    key = kern.cache_key(src, frags, "gcc 12")
    assert key == kern.cache_key(src, dict(frags), "gcc 12")
    assert key != kern.cache_key(src, frags | {"xen": "CONFIG_XEN=n\n"}, "gcc 12")
    assert key != kern.cache_key(src, frags, "gcc 13")
    src.write_bytes(b"other source")
    assert key != kern.cache_key(src, frags, "gcc 12")


def test_cache_key_covers_the_arch(tmp_path: Path) -> None:
    """Same source, fragments and compiler text: another architecture is another kernel; amd64's key is
    the one it was before arm64 existed (the warm caches stay valid)."""
    src = tmp_path / "linux.tar.xz"
    src.write_bytes(b"source bytes")
    frags = {"base": "CONFIG_A=y\n"}
    amd64 = kern.cache_key(src, frags, "gcc 12", {})
    assert amd64 == kern.cache_key(src, frags, "gcc 12", {}, "amd64")
    assert amd64 != kern.cache_key(src, frags, "gcc 12", {}, "arm64")
    h = hashlib.sha256(b"xbuild-kernel-1: tinyconfig, fragments merged with allnoconfig, make bzImage\0")
    h.update(hashlib.sha256(b"source bytes").digest() + b"\0fragment base\0CONFIG_A=y\n\0toolchain\0gcc 12")
    assert amd64 == h.hexdigest()
    # the key covers the cross compiler's version: build_key asks aarch64-linux-gnu-gcc, not gcc
    assert kern._toolchain("arm64").startswith("aarch64-linux-gnu-gcc")


def test_cache_key_covers_the_patches(tmp_path: Path) -> None:
    """A patch's name or text changes the key; None means the patches in kernels/patches/."""
    src = tmp_path / "linux.tar.xz"
    src.write_bytes(b"source bytes")
    frags = {"base": "CONFIG_A=y\n"}
    plain = kern.cache_key(src, frags, "gcc", {})
    one = kern.cache_key(src, frags, "gcc", {"a.patch": "+x\n"})
    assert len({plain, one, kern.cache_key(src, frags, "gcc", {"a.patch": "+y\n"})}) == 3
    assert one != kern.cache_key(src, frags, "gcc", {"b.patch": "+x\n"})
    assert kern.patches() and kern.cache_key(src, frags, "gcc") == kern.cache_key(
        src, frags, "gcc", kern.patches()
    )


def test_a_patch_for_another_architecture_is_left_out() -> None:
    """The arm64 kernel gets the patches outside arch/ and none of the arch/x86-only ones; its key is made of
    those, so an x86 patch does not change it."""
    every = sorted(p.name for p in kern.PATCHES_DIR.glob("*.patch"))
    x86_only = {"x86-keep-init-text.patch", "x86-small-kernel-span.patch", "xen-calibrate-cpu.patch"}
    assert list(kern.patches("amd64")) == every
    assert list(kern.patches("arm64")) == [n for n in every if n not in x86_only]
    assert kern._touches("+++ b/arch/x86/a.c\n+++ b/mm/b.c\n", "arch/arm64/")  # one shared file: applied
    assert not kern._touches("+++ b/arch/x86/a.c\n", "arch/arm64/")


def test_kernel_patches_apply_to_the_release_source() -> None:
    """Every kernels/patches/*.patch applies cleanly to Debian's linux-source (a dry run: nothing written)."""
    source = kern.default_source()
    with tempfile.TemporaryDirectory() as work:
        for name in sorted(p.name for p in kern.PATCHES_DIR.glob("*.patch")):  # every arch's
            files = re.findall(r"^\+\+\+ b/(\S+)", (kern.PATCHES_DIR / name).read_text(), re.M)
            assert files, name
            globs = [f"*/{f}" for f in files]
            subprocess.run(["tar", "-xf", str(source), "-C", work, "--wildcards", *globs], check=True)
            (top,) = Path(work).iterdir()
            r = subprocess.run(
                ["patch", "-p1", "--dry-run", "--batch", "--forward", "-i", str(kern.PATCHES_DIR / name)],
                cwd=top,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stdout + r.stderr


def test_a_patch_that_does_not_apply_fails_the_build_and_leaves_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source directory is patched in a copy (the user's tree is never changed); a patch that does not
    apply is a KernelError naming it, and no cache entry is left."""
    monkeypatch.setenv("XBUILD_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "linux"
    (tree / "arch/x86/xen").mkdir(parents=True)
    (tree / "arch/x86/xen/time.c").write_text("not the file the patch expects\n")
    first = next(iter(kern.patches()))  # applied in name order: the first one fails, and stops the build
    with pytest.raises(KernelError, match=rf"kernel build failed: patch -p1 .*{re.escape(first)}"):
        kern.build(("base",), tree)
    assert (tree / "arch/x86/xen/time.c").read_text() == "not the file the patch expects\n"
    assert sorted(p.name for p in (tree / "arch/x86/xen").iterdir()) == ["time.c"]
    assert not [p for p in (tmp_path / "cache/kernels").iterdir() if not p.name.endswith(".log")]


def test_cache_key_source_tree(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    (tree / "kernel").mkdir(parents=True)
    (tree / "kernel/fork.c").write_text("int x;")
    key = kern.cache_key(tree, {"base": ""}, "gcc")
    assert key == kern.cache_key(tree, {"base": ""}, "gcc")
    (tree / "kernel/fork.c").write_text("int y;")
    assert key != kern.cache_key(tree, {"base": ""}, "gcc")


# ---------------------------------------------------------------------------------------------- slow


def _bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "kernel_boot.py"
    spec = importlib.util.spec_from_file_location("kernel_boot", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_default_kernel_verifies_and_boots() -> None:
    k = kern.default_kernel()
    assert k in kern.list_kernels()
    assert kern.default_kernel() == k  # cached: same key, no rebuild
    assert kern.verify(k.path).modes == ("pv", "pvh", "qemu")
    assert kern.verify(k.bzimage).modes == ("pv", "pvh", "qemu")
    assert k.bzimage.stat().st_size <= 4_000_000
    bench = _bench()
    result = bench.boot(k.path, bench.marker_initramfs(), f"console=ttyS0 panic=-1 {kern.cmdline()}")
    assert 0 < result.marker_us < 1_000_000


@pytest.mark.slow
def test_arm64_kernel_verifies_and_boots() -> None:
    """The arm64 kernel (cross-built once, cached; cold: 18 min wall, 16 min CPU at load 5-7): an Image
    with the Xen guest support verify() reads from its embedded .config, listed with its arch, booted under
    qemu-system-aarch64 -M virt to the marker (cross-compiled) on the PL011 console."""
    k = kern.default_kernel(arch="arm64")
    assert (k.arch, k.fmt, k.path.name, k.bzimage) == ("arm64", "image", "Image", None)
    assert k in kern.list_kernels() and kern.default_kernel(arch="arm64") == k
    assert k.key == kern.build_key(arch="arm64") != kern.build_key()
    assert kern.verify(k.path, arch="arm64").modes == ("xen", "qemu")
    with pytest.raises(KernelError, match="not an arm64 Image"):
        kern.verify(kern.default_kernel().path, arch="arm64")
    bench = _bench()
    target = bench.TARGETS["arm64"]
    append = f"console={target.console} panic=-1 {kern.cmdline('arm64')}"
    result = bench.boot(k.path, bench.marker_initramfs(target), append, qemu=target.qemu)
    assert 0 < result.marker_us < 2_000_000 and result.tsc_us


COMPAT_C = r"""/* xbuild test program: calls what kernels/compat.config provides; one line per call,
   exits with the number of failures. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <unistd.h>

/* the seccomp/BPF ABI of linux/filter.h and linux/seccomp.h, which musl-gcc cannot include */
struct sock_filter { unsigned short code; unsigned char jt, jf; unsigned int k; };
struct sock_fprog { unsigned short len; struct sock_filter *filter; };
#define LOAD_NR {0x20, 0, 0, 0}                 /* BPF_LD|BPF_W|BPF_ABS, seccomp_data.nr at offset 0 */
#define JEQ(k, jt, jf) {0x15, jt, jf, k}        /* BPF_JMP|BPF_JEQ|BPF_K */
#define RET(k) {0x06, 0, 0, k}                  /* BPF_RET|BPF_K */
#define SECCOMP_SET_MODE_FILTER 1
#define SECCOMP_RET_ERRNO 0x00050000U
#define SECCOMP_RET_ALLOW 0x7fff0000U

static int failures;

static void check(const char *what, int ok) {
    printf("compat: %s %s\n", what, ok ? "ok" : strerror(errno));
    failures += !ok;
}

int main(void) {
    int shm = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    char *p = shm >= 0 ? shmat(shm, NULL, 0) : (void *)-1;
    check("shmget", p != (void *)-1 && strcpy(p, "x") && shmdt(p) == 0 && shmctl(shm, IPC_RMID, NULL) == 0);

    int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    struct sembuf up = {0, 1, 0};
    check("semget", sem >= 0 && semop(sem, &up, 1) == 0 && semctl(sem, 0, GETVAL) == 1
                    && semctl(sem, 0, IPC_RMID) == 0);

    int q = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    struct { long type; char text[8]; } msg = {1, "hello"}, got = {0, ""};
    check("msgget", q >= 0 && msgsnd(q, &msg, sizeof msg.text, 0) == 0
                    && msgrcv(q, &got, sizeof got.text, 1, 0) == sizeof got.text
                    && strcmp(got.text, "hello") == 0 && msgctl(q, IPC_RMID, NULL) == 0);

    struct mq_attr attr = {.mq_maxmsg = 4, .mq_msgsize = 16};
    char buf[16] = "";
    mqd_t mq = mq_open("/xbuild-compat", O_CREAT | O_RDWR, 0600, &attr);
    check("mq_open", mq != (mqd_t)-1 && mq_send(mq, "hello", 6, 0) == 0
                     && mq_receive(mq, buf, sizeof buf, NULL) == 6 && strcmp(buf, "hello") == 0
                     && mq_close(mq) == 0 && mq_unlink("/xbuild-compat") == 0);

    int mfd = memfd_create("xbuild-compat", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    check("memfd_create", mfd >= 0 && write(mfd, "hello", 5) == 5
                          && fcntl(mfd, F_ADD_SEALS, F_SEAL_WRITE) == 0 && write(mfd, "x", 1) == -1
                          && close(mfd) == 0);

    char ev[sizeof(struct inotify_event) + 256];
    int in = inotify_init1(IN_CLOEXEC);
    int ok = in >= 0 && inotify_add_watch(in, "/tmp", IN_CREATE) >= 0;
    int fd = ok ? open("/tmp/xbuild-compat", O_CREAT | O_WRONLY, 0600) : -1;
    ok = ok && fd >= 0 && read(in, ev, sizeof ev) > 0 && ((struct inotify_event *)ev)->mask & IN_CREATE
            && strcmp(((struct inotify_event *)ev)->name, "xbuild-compat") == 0;
    check("inotify_init1", ok);

    struct { struct file_handle h; unsigned char bytes[128]; } fh = {.h.handle_bytes = 128};
    int mount_id, hfd = -1;
    ok = name_to_handle_at(AT_FDCWD, "/tmp/xbuild-compat", &fh.h, &mount_id, 0) == 0;
    if (ok) {   /* open_by_handle_at needs a descriptor on the same mount */
        int dir = open("/tmp", O_RDONLY | O_DIRECTORY);
        hfd = open_by_handle_at(dir, &fh.h, O_RDONLY);
        ok = hfd >= 0;
    }
    check("name_to_handle_at", ok);

    struct sock_filter insns[] = {LOAD_NR, JEQ(SYS_getppid, 0, 1), RET(SECCOMP_RET_ERRNO | 99),
                                  RET(SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {sizeof insns / sizeof insns[0], insns};
    ok = prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
         && syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) == 0;
    check("seccomp", ok && syscall(SYS_getppid) == -1 && errno == 99);
    return failures;
}
"""
COMPAT_CALLS = (
    "shmget",
    "semget",
    "msgget",
    "mq_open",
    "memfd_create",
    "inotify_init1",
    "name_to_handle_at",
    "seccomp",
)


@pytest.mark.slow
def test_default_kernel_has_what_servers_call(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, default_kernel_path: Path
) -> None:
    """The default kernel (with `compat`) runs System V IPC, POSIX message queues, memfd, inotify, file
    handles and seccomp filters: a static program calls each through the real CLI's build and run."""
    from tests.fixtures import images as fx
    from tests.test_cli import xbuild

    probe = fx.static_binary(COMPAT_C, "compat", tmp_path_factory)
    members = [fx.dir("bin/"), fx.file("bin/compat", probe, mode=0o755), fx.dir("tmp/", mode=0o1777)]
    fx.write_oci_image(tmp_path / "oci", "compat", [members], {"Entrypoint": ["/bin/compat"]})
    out = tmp_path / "art"
    r = xbuild(f"oci:{tmp_path / 'oci'}:compat", "-o", str(out), "--kernel", str(default_kernel_path), "-q")
    assert r.returncode == 0, r.stderr
    r = xbuild("run", str(out), "--timeout", "120")
    lines = [line.strip() for line in r.stdout.splitlines() if line.startswith("compat: ")]
    assert lines == [f"compat: {call} ok" for call in COMPAT_CALLS], r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------- cli


def test_cli_list_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from builder.kernel_cli import kernel

    monkeypatch.setenv("XBUILD_CACHE", str(tmp_path))
    assert CliRunner().invoke(kernel, ["list", "--json"]).output.strip() == "[]"
    d = tmp_path / "kernels" / "abc"
    d.mkdir(parents=True)
    meta = {
        "key": "abc",
        "path": "x/vmlinux",
        "fmt": "elf",
        "fragments": ["base"],
        "release": "6.1.1",
        "size": 9,
        "arch": "amd64",
    }
    (d / "kernel.json").write_text(json.dumps(meta))
    (tmp_path / "kernels" / ".abc.partial").mkdir()  # an unfinished build is not listed
    result = CliRunner().invoke(kernel, ["list", "--json"])
    assert result.exit_code == 0, result.output
    [listed] = json.loads(result.output)
    assert listed | {"path": "", "bzimage": ""} == meta | {"path": "", "bzimage": "", "patches": []}
    assert listed["path"] == str(d / "vmlinux")
    assert "abc" in CliRunner().invoke(kernel, ["list"]).output


def test_cli_build_unknown_fragment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from builder.kernel_cli import kernel

    monkeypatch.setenv("XBUILD_CACHE", str(tmp_path))
    src = tmp_path / "linux.tar.xz"
    src.write_bytes(b"")
    result = CliRunner().invoke(kernel, ["build", "--fragment", "nope", "--source", str(src), "--json"])
    assert isinstance(result.exception, KernelError)
    assert "no kernel fragment 'nope'" in str(result.exception)
    arm = CliRunner().invoke(
        kernel, ["build", "--platform", "linux/arm64", "--fragment", "arch", "--source", str(src), "--json"]
    )
    assert isinstance(arm.exception, KernelError)  # arm64 has `arch`: the empty tarball is what fails
    assert str(arm.exception).startswith("kernel build failed: tar -xf")
    amd = CliRunner().invoke(kernel, ["build", "--fragment", "arch", "--source", str(src), "--json"])
    assert "no kernel fragment 'arch' for amd64" in str(amd.exception)
    bad = CliRunner().invoke(kernel, ["build", "--platform", "linux/s390x", "--source", str(src)])
    assert bad.exit_code == 2 and "linux/s390x" in bad.output
