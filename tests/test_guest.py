"""builder.guest: the image config → guest config rules (pure; no boot).

The rules, from the OCI image-spec's conversion.md and runc's/docker's behaviour:
- argv = Entrypoint + Cmd; neither → error.
- env: PATH (docker's default unless the image sets it), HOSTNAME, then the image's Env in order
  (replacing by key), then HOME from the passwd entry ("/" without one) when Env has none.
- User forms: "", name, uid, name:group, uid:gid, uid:group, name:gid. A numeric part is always an id;
  a name must exist in the image's /etc/passwd or /etc/group. Without an explicit group the passwd
  gid and every group listing the user name apply; the primary gid is always in the groups list.
- StopSignal: number or (SIG)NAME in any case, RTMIN+n; default SIGTERM.
"""

from __future__ import annotations

import dataclasses

import pytest

from builder.errors import ConfigError
from builder.guest import (
    DEFAULT_PATH,
    INIT_CMDLINE,
    ROOT_DEVICES,
    GuestConfig,
    boot_tree,
    census,
    guest_config,
    install,
    merge_env,
    parse_signal,
    resolve_user,
)
from builder.image import ImageConfig
from builder.tree import CHAR, SYMLINK, Inode, Tree, regular

PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\n"
    b"# a comment\n"
    b"app:x:1000:1000:App:/home/app:/bin/sh\n"
    b"svc:x:2000:2001::/srv:/bin/false\n"
    b"nohome:x:3000:3000::\n"
    b"broken line\n"
)
GROUP = b"root:x:0:\nwheel:x:10:root,app\nstaff:x:50:app, svc\napp:x:1000:\nsvcgrp:x:2001:\ndup:x:10:app\n"


@pytest.fixture
def tree() -> Tree:
    t = Tree()
    t.add("etc/passwd", regular(PASSWD))
    t.add("etc/group", regular(GROUP))
    return t


@pytest.mark.parametrize(
    "user,expected",
    [
        ("", (0, 0, (0, 10), "/root")),
        ("root", (0, 0, (0, 10), "/root")),
        ("app", (1000, 1000, (1000, 10, 50), "/home/app")),
        ("1000", (1000, 1000, (1000, 10, 50), "/home/app")),
        ("app:staff", (1000, 50, (50,), "/home/app")),
        ("app:7", (1000, 7, (7,), "/home/app")),
        ("1000:svcgrp", (1000, 2001, (2001,), "/home/app")),
        ("1000:2001", (1000, 2001, (2001,), "/home/app")),
        ("svc", (2000, 2001, (2001, 50), "/srv")),
        ("4242", (4242, 0, (0,), "/")),
        ("4242:77", (4242, 77, (77,), "/")),
        ("4242:staff", (4242, 50, (50,), "/")),
        ("nohome", (3000, 3000, (3000,), "/")),
    ],
)
def test_user_forms(tree: Tree, user: str, expected: tuple) -> None:
    assert resolve_user(user, tree) == expected


@pytest.mark.parametrize(
    "user,match",
    [
        ("nobody", "no user 'nobody'"),
        ("app:nogroup", "no group 'nogroup'"),
        ("4242:nogroup", "no group 'nogroup'"),
        ("app:", "empty group"),
        (":staff", "empty user"),
    ],
)
def test_user_errors_name_the_user(tree: Tree, user: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        resolve_user(user, tree)
    assert repr(user) in str(e.value)


def test_no_passwd_file() -> None:
    assert resolve_user("", Tree()) == (0, 0, (0,), "/")
    assert resolve_user("123:456", Tree()) == (123, 456, (456,), "/")
    with pytest.raises(ConfigError):
        resolve_user("app", Tree())


def test_passwd_through_symlink() -> None:
    t = Tree()
    t.add("data/passwd", regular(b"u:x:5:6::/h:/bin/sh\n"))
    t.add("etc/passwd", Inode(SYMLINK, 0o777, target="../data/passwd"))
    assert resolve_user("u", t) == (5, 6, (6,), "/h")


@pytest.mark.parametrize(
    "text,num",
    [
        ("", 15),
        ("SIGTERM", 15),
        ("TERM", 15),
        ("sigquit", 3),
        ("QUIT", 3),
        ("9", 9),
        ("SIGKILL", 9),
        ("SIGUSR1", 10),
        ("SIGWINCH", 28),
        ("SIGRTMIN", 34),
        ("SIGRTMIN+3", 37),
        ("RTMAX", 64),
        ("SIGRTMAX-2", 62),
        ("SIGPWR", 30),
    ],
)
def test_stop_signal(text: str, num: int) -> None:
    assert parse_signal(text) == num


@pytest.mark.parametrize("text", ["SIGNOPE", "0", "65", "RTMIN+40", "-1"])
def test_bad_stop_signal(text: str) -> None:
    with pytest.raises(ConfigError, match="StopSignal"):
        parse_signal(text)


def test_env_rules(tree: Tree) -> None:
    gc = guest_config(ImageConfig(cmd=("x",)), tree, "h")
    assert gc.env == (f"PATH={DEFAULT_PATH}", "HOSTNAME=h", "HOME=/root")
    env = ("A=1", "PATH=/bin", "HOME=/custom", "A=2", "B")
    gc = guest_config(ImageConfig(cmd=("x",), env=env, user="app"), tree, "h")
    assert gc.env == ("PATH=/bin", "HOSTNAME=h", "A=2", "HOME=/custom")
    gc = guest_config(ImageConfig(cmd=("x",), env=("HOSTNAME=img",), user="4242"), tree, "h")
    assert gc.env == (f"PATH={DEFAULT_PATH}", "HOSTNAME=img", "HOME=/")


def test_merge_env() -> None:
    assert merge_env(["A=1", "B=2"], ["B=3", "C=4=5", "A", "D="]) == ["B=3", "C=4=5", "D="]


def test_argv_cwd_and_cmd_index(tree: Tree) -> None:
    gc = guest_config(ImageConfig(entrypoint=("/e", "-x"), cmd=("a", "b c")), tree, "h")
    assert gc.argv == ("/e", "-x", "a", "b c") and gc.cmd_index == 2
    assert gc.cwd == "/" and gc.stop_signal == 15 and gc.hostname == "h"
    assert guest_config(ImageConfig(cmd=("a",)), tree, "h").cmd_index == 0
    for wd, cwd in [("/srv/app/", "/srv/app"), ("srv", "/srv"), ("/a/../b", "/b"), ("//x", "/x")]:
        assert guest_config(ImageConfig(cmd=("a",), working_dir=wd), tree, "h").cwd == cwd


def test_no_command(tree: Tree) -> None:
    with pytest.raises(ConfigError, match="neither Entrypoint nor Cmd"):
        guest_config(ImageConfig(env=("A=1",)), tree, "h")


def test_user_error_from_guest_config(tree: Tree) -> None:
    with pytest.raises(ConfigError, match="'ghost'"):
        guest_config(ImageConfig(cmd=("a",), user="ghost"), tree, "h")


def test_encode_format_and_roundtrip(tree: Tree) -> None:
    gc = GuestConfig(
        argv=("/bin/sh", "-c", "echo é"),
        env=("A=1", "B="),
        cwd="/w",
        uid=1,
        gid=2,
        groups=(2, 3),
        stop_signal=3,
        hostname="h",
        cmd_index=1,
    )
    data = gc.encode()
    assert data.startswith(b"xbuild-guest-config\x001\x00arg\x00/bin/sh\x00arg\x00-c\x00")
    assert data.endswith(b"grace\x0010\x00")
    assert b"cmd\x001\x00" in data and b"group\x002\x00group\x003\x00" in data
    assert GuestConfig.decode(data) == gc
    with pytest.raises(ConfigError, match="NUL"):
        GuestConfig(
            argv=("a\0b",), env=(), cwd="/", uid=0, gid=0, groups=(), stop_signal=15, hostname=""
        ).encode()


def test_root_disk_records_roundtrip() -> None:
    gc = GuestConfig(argv=("a",), env=(), cwd="/", uid=0, gid=0, groups=(), stop_signal=15, hostname="h")
    assert b"root\0" not in gc.encode()  # an initramfs guest has no root records
    disk = dataclasses.replace(gc, root_devices=ROOT_DEVICES, root_mode="ro", root_wait_s=3)
    data = disk.encode()
    assert data.endswith(b"root\0/dev/vda\0root\0/dev/xvda\0rootmode\0ro\0rootwait\x003\0")
    assert GuestConfig.decode(data) == disk


def test_boot_tree_holds_only_the_init(tree: Tree) -> None:
    gc = guest_config(ImageConfig(cmd=("a",)), tree, "h")
    install(tree, gc, b"\x7fELFinit")
    boot = boot_tree(tree)
    assert sorted(p for p, _ in boot.walk()) == [
        "",
        ".xbuild",
        ".xbuild/config",
        ".xbuild/init",
        "dev",
        "dev/console",
        "init",
    ]
    assert boot.read("init") == b"\x7fELFinit"
    assert boot.read(".xbuild/config") == gc.encode() + census(tree).records()  # the full tree's census


def test_install(tree: Tree) -> None:
    gc = guest_config(ImageConfig(cmd=("a",)), tree, "h")
    install(tree, gc, b"\x7fELFinit")
    init = tree.lookup(".xbuild/init")
    assert init is not None and init.mode == 0o755 and init.content == b"\x7fELFinit"
    assert tree.read(".xbuild/config") == gc.encode() + census(tree).records()
    link = tree.lookup("init")
    assert link is not None and link.kind == SYMLINK and link.target == ".xbuild/init"
    assert tree.read("init") == b"\x7fELFinit"
    console = tree.lookup("dev/console")
    assert console is not None and console.kind == CHAR and console.rdev == (5, 1)
    assert INIT_CMDLINE == "rdinit=/.xbuild/init"


def test_install_never_clobbers_the_images_init(tree: Tree) -> None:
    tree.add("init", regular(b"#!/bin/sh\n# s6-overlay\n", 0o755))
    tree.add("dev/console", Inode(CHAR, 0o620, rdev=(5, 1)))
    install(tree, guest_config(ImageConfig(entrypoint=("/init",)), tree, "h"), b"ours")
    assert tree.read("init") == b"#!/bin/sh\n# s6-overlay\n"
    assert tree.read(".xbuild/init") == b"ours"
    console = tree.lookup("dev/console")
    assert console is not None and console.mode == 0o620
