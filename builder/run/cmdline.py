"""The guest kernel command line of a run: the artifact's words, the runner's, then the user's.

The guest's init reads /proc/cmdline (initramfs/init.c, read_cmdline): words are separated by spaces, tabs
and newlines outside double quotes, and every double quote is removed; the first bare `--` ends the words
the init reads (xbuild.env=, xbuild.grace=, ...), everything after it replaces the image's Cmd. So a word
reaches the init unchanged when it is written bare, or between double quotes when it is empty or holds a
space. A word holding a double quote or any other character that is not printable cannot be written
(BadInput), nor a `--` among the words before the separator (it would become the separator). The whole line
is at most CMDLINE_MAX bytes: x86's boot protocol cuts a longer one without a word; at most INIT_ARGS_MAX
words follow `--`.

Both runners use `with_args` (QEMU's `-append`, the `extra=` of the xl config Xen boots); the artifact's
own words are validated already (builder/artifact.py, CMDLINE_WORD) and are kept as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..artifact import CMDLINE_MAX
from ..errors import ConfigError

SEPARATOR = "--"
SYNC_UNPACK = "initramfs_async=0"  # a guest with a NIC: see `with_ip`
INIT_ARGS_MAX = 31  # Linux hands init at most CONFIG_INIT_ENV_ARG_LIMIT (32) argv words, its name first,
# and panics at boot past that: the words after `--` are refused beyond this


def split(cmdline: str) -> tuple[list[str], list[str]]:
    """The words before the first bare `--` and those after it."""
    words = cmdline.split()
    if SEPARATOR not in words:
        return words, []
    i = words.index(SEPARATOR)
    return words[:i], words[i + 1 :]


def quote(word: str) -> str:
    """`word` as the init's parser will read it back; ConfigError when no spelling can carry it."""
    if '"' in word or not word.isprintable():
        raise ConfigError(
            f"cannot pass {word!r} on the kernel command line "
            "(double quotes and control characters cannot be quoted there)"
        )
    return f'"{word}"' if not word or " " in word else word


def with_ip(line: str, ip_word: str) -> str:
    """`line` with `ip_word` (the kernel's `ip=`) instead of any `ip=` among the words before `--`, and
    SYNC_UNPACK: a guest with a NIC unpacks its initramfs before any driver probes, so the NIC's receive
    ring (xen-netfront fills 256 pages per queue when it connects) is allocated after the compressed initrd
    is freed, not on top of the unpack's peak (builder/memory.py, NIC_BYTES)."""
    head, tail = split(line)
    head = [w for w in head if not w.startswith("ip=") and w != SYNC_UNPACK] + [SYNC_UNPACK, ip_word]
    return " ".join(head + ([SEPARATOR, *tail] if tail else []))


def with_args(base: str, kernel_args: Sequence[str] = (), extra_args: Sequence[str] = ()) -> str:
    """`base` + `kernel_args` (read by the init), then ` -- ` and `extra_args` (they replace the Cmd, and
    the words after base's own `--`; without extra_args those are kept)."""
    head, tail = split(base)
    for word in kernel_args:
        if word == SEPARATOR:
            raise ConfigError("`--` cannot be passed as a kernel argument: it would end them")
    head += [quote(w) for w in kernel_args]
    if extra_args:
        tail = [quote(w) for w in extra_args]
    if len(tail) > INIT_ARGS_MAX:
        raise ConfigError(
            f"{len(tail)} words after `--`: a guest kernel hands its init at most "
            f"{INIT_ARGS_MAX} (it panics past that)"
        )
    line = " ".join(head + ([SEPARATOR, *tail] if tail else []))
    if len(line.encode()) > CMDLINE_MAX:
        raise ConfigError(
            f"the kernel command line would be {len(line.encode())} bytes, more than the "
            f"{CMDLINE_MAX} a guest kernel reads"
        )
    return line
