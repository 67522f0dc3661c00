"""The trace probe (builder/minimize/probe.py): its log parser, its staging, and (root, bwrap, strace) its
sandbox against an entrypoint that tries the known escapes.

Every hostile case builds a busybox image whose entrypoint is a shell script, runs the real CLI with
`--minimize trace` in a `sandbox`, and asserts: exit 0 (a hostile entrypoint only fails its own
escapes), the host marker file and the host canary directory unchanged, nothing written outside the
sandbox but the output, no temp file or staging mount left, no process of the sandbox's uid range left,
and no "leak" kept. The leak channel: the image carries empty files /leaked/<case>; the script touches
/leaked/<case> only when an escape worked, so a working escape shows up as a path the trace kept.
`test_leak_channel_works` proves that channel can fail the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import MinimizeError
from builder.image import ImageConfig
from builder.minimize.probe import (
    CAPS,
    HOST_ID_BASE,
    ID_COUNT,
    TOOLS,
    check_probe_host,
    extract,
    host_id,
    probe,
    traced_paths,
)
from builder.tree import Tree
from tests.fixtures import images as fx
from tests.fixtures.hostile import XBUILD, Sandbox, assert_refused
from tests.fixtures.minimize_images import add_file, add_host_file, add_link

CAN_PROBE = os.geteuid() == 0 and all(shutil.which(t) for t in ("bwrap", "strace", "setpriv", "prlimit"))
needs_probe = pytest.mark.skipif(not CAN_PROBE, reason="needs root, bwrap, strace and util-linux")
SECRET_VAR = "XBUILD_PROBE_SECRET"

# -- the log parser and the staging (no sandbox needed) ---------------------------------------------

STRACE_LOG = """\
500 execve("/usr/bin/setpriv", ["setpriv", "--reuid=1878982656"], 0x7ffd /* 1 var */) = 0
500 execve("/usr/bin/bwrap", ["bwrap", "--unshare-user"], 0x7ffd /* 1 var */) = 0
500 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3
500 clone(child_stack=NULL, flags=CLONE_NEWNS|CLONE_NEWUSER|CLONE_NEWPID|SIGCHLD) = 501
501 mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID|MS_NODEV, NULL) = 0
501 mkdir("newroot", 0755) = 0
501 openat(AT_FDCWD, "/oldroot/host/only", O_RDONLY) = 3
501 clone(child_stack=NULL, flags=SIGCHLD) = 2
502 execve("/usr/local/sbin/web", ["web"], 0x55 /* 3 vars */) = -1 ENOENT (No such file or directory)
502 execve("/usr/sbin/web", ["web"], 0x55 /* 3 vars */) = 0
502 openat(AT_FDCWD, "/etc/web.conf", O_RDONLY <unfinished ...>
501 wait4(-1,  <unfinished ...>
502 <... openat resumed>) = 4
502 clone3({flags=CLONE_VM, ...}, 88 <unfinished ...>
502 <... clone3 resumed>) = 3
503 newfstatat(AT_FDCWD, "data/file\\x41.txt", {st_mode=S_IFREG|0644, ...}, 0) = 0
503 access("/etc/ld.so.preload", R_OK) = -1 ENOENT (No such file or directory)
500 openat(AT_FDCWD, "/launcher/only", O_RDONLY) = 3
501 openat(AT_FDCWD, "/reaper/only", O_RDONLY) = 3
"""


def test_traced_paths_start_at_the_entrypoints_exec() -> None:
    """bwrap's own setup (the launcher, the sandbox's pid 1) is not the entrypoint's: only what the
    processes after the first exec of another pid named counts, relative paths against WorkingDir."""
    assert traced_paths(STRACE_LOG.splitlines(), "/app", {501}) == {
        "usr/local/sbin/web",
        "usr/sbin/web",
        "etc/web.conf",
        "app/data/fileA.txt",
        "etc/ld.so.preload",
    }
    assert traced_paths([], "/", set()) == set()


def test_extract_tree(tmp_path: Path) -> None:
    t = Tree()
    f = add_file(t, "a/file", b"data", 0o750)
    t.add("b/hard", f)
    add_link(t, "a/link", "../b/hard")
    add_link(t, "escape", "/etc/passwd")
    add_host_file(t, "bin/ls", "/usr/bin/ls")
    extract(t, tmp_path / "root")
    r = tmp_path / "root"
    assert (r / "a/file").read_bytes() == b"data" and (r / "a/file").stat().st_mode & 0o777 == 0o750
    assert (r / "a/file").stat().st_ino == (r / "b/hard").stat().st_ino
    assert os.readlink(r / "a/link") == "../b/hard" and os.readlink(r / "escape") == "/etc/passwd"
    assert (r / "bin/ls").read_bytes() == Path("/usr/bin/ls").read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_extract_owners_are_the_sandbox_ids(tmp_path: Path) -> None:
    """Staged for the sandbox, owner 0 is HOST_ID_BASE, 33 is HOST_ID_BASE+33; ids the namespace does
    not map are its nobody."""
    t = Tree()
    add_file(t, "root-file", b"r")
    add_file(t, "www/data", b"w").uid = 33
    add_file(t, "big-id", b"b").uid = 1_000_000
    extract(t, tmp_path / "root", HOST_ID_BASE)
    r = tmp_path / "root"
    assert r.stat().st_uid == HOST_ID_BASE
    assert (r / "root-file").stat().st_uid == HOST_ID_BASE
    assert (r / "www/data").stat().st_uid == HOST_ID_BASE + 33
    assert (r / "big-id").stat().st_uid == HOST_ID_BASE + 65534 == host_id(ID_COUNT)


def test_check_probe_host_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MinimizeError, match=r"trace probe cannot run on this host \(not root\).*auto$"):
        check_probe_host(trace=True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        MinimizeError,
        match=r"\(install the Debian packages bubblewrap, mount, strace, "
        r"util-linux\); use --minimize auto$",
    ):
        check_probe_host(trace=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="xbuild's probe check needs root first")
def test_cli_without_bubblewrap_is_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    """Every tool but bwrap on PATH: one line naming the package, exit 2, nothing written."""
    image = fx.make_busybox_image(tmp_path / "oci")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in [*TOOLS, "strace"]:
        if tool != "bwrap" and shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool) or "")
    before = sandbox.snapshot()
    r = sandbox.xbuild(
        image.ref,
        "--minimize",
        "trace",
        "--kernel",
        "none",
        "-o",
        str(sandbox.out),
        "-q",
        env=sandbox.env(PATH=str(bindir)),
    )
    assert_refused(r, 2, "install the Debian package bubblewrap", "--minimize auto")
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="xbuild's probe check needs root first")
def test_cli_without_bubblewrap_refuses_before_the_pull(sandbox: Sandbox, tmp_path: Path) -> None:
    """The host check comes first: with bwrap missing, a reference to a registry on a closed port gets
    the bubblewrap line, not a registry error (nothing was pulled)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in [*TOOLS, "strace"]:
        if tool != "bwrap" and shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool) or "")
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    before = sandbox.snapshot()
    r = sandbox.xbuild(
        f"127.0.0.1:{port}/nothing/here:latest",
        "--minimize",
        "trace",
        "--kernel",
        "none",
        "-o",
        str(sandbox.out),
        "-q",
        env=sandbox.env(PATH=str(bindir)),
    )
    assert_refused(r, 2, "install the Debian package bubblewrap", "--minimize auto")
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


def probe_mounts() -> set[str]:
    """Lines of the host's mount table (this test's mount namespace) naming an xbuild probe mount."""
    return {line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "xbuild-probe" in line}


def descendants(pid: int) -> dict[int, str]:
    """pid → command line of every live descendant of `pid`."""
    parent: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(stat_file.parent.name)] = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a process that is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@needs_probe
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_during_the_trace_leaves_nothing(
    sig: signal.Signals, sandbox: Sandbox, tmp_path: Path
) -> None:
    """xbuild killed while the entrypoint runs in the sandbox: no probe mount in the host's mount table
    (not even while it runs), no staging or temp directory, no process of the chain (setpriv, strace,
    bwrap, the entrypoint) left. SIGTERM: an interrupt (exit 143, `xbuild: interrupted (SIGTERM)`),
    and nothing written."""
    token = str(100000 + secrets.randbelow(800000))
    image = fx.make_busybox_image(
        tmp_path / "oci", config_overrides={"Entrypoint": ["/bin/sleep", token], "Cmd": []}
    )
    recipe = sandbox.root / "work" / "trace.toml"
    recipe.write_text("[trace]\nseconds = 300\n")
    mounts, staged = probe_mounts(), staging_dirs()
    before = sandbox.snapshot()
    args = [
        image.ref,
        "--minimize",
        "trace",
        "--recipe",
        str(recipe),
        "--kernel",
        "none",
        "-o",
        str(sandbox.out),
    ]
    proc = subprocess.Popen(
        [*XBUILD, *args, "-q"],
        cwd=sandbox.root / "work",
        env=sandbox.env(),
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        chain: dict[int, str] = {}
        deadline = time.monotonic() + 120
        while not any(cmd.strip() == f"/bin/sleep {token}" for cmd in chain.values()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the sandbox did not start: {chain}"
            time.sleep(0.1)
            chain = descendants(proc.pid)
        assert any("strace" in c for c in chain.values()) and any("bwrap" in c for c in chain.values())
        assert probe_mounts() == mounts, "the probe's tmpfs is visible in the host's mount namespace"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while [p for p in chain if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {p: c for p, c in chain.items() if alive(p)} == {}
    assert probe_mounts() == mounts and staging_dirs() == staged
    assert sandbox.stale_temps() == []
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and stderr.strip().splitlines() == ["xbuild: interrupted (SIGTERM)"], (
            stderr
        )
        assert sandbox.changes(before) == []
    else:
        assert proc.returncode == -signal.SIGKILL


# -- the sandbox as the entrypoint sees it ------------------------------------------------------------

ESCAPE_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* exit 0 only when the escape worked */
int main(int argc, char **argv) {
	if (argc >= 2 && !strcmp(argv[1], "euid")) {
		printf("euid %d\n", (int)geteuid());
		return geteuid() == 0 ? 0 : 1;
	}
	if (argc >= 2 && !strcmp(argv[1], "drop")) {     /* become nobody, then exec ourselves: setuid root */
		if (setgid(65534) || setuid(65534))
			return 3;
		execl("/bin/escape", "escape", "euid", (char *)0);
		return 4;
	}
	if (argc >= 3 && !strcmp(argv[1], "ptrace")) {
		long r = ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0);
		printf("ptrace %s: %ld %s\n", argv[2], r, r ? strerror(errno) : "attached");
		return r == 0 ? 0 : 1;
	}
	if (argc >= 3 && !strcmp(argv[1], "chroot")) {   /* the classic: chroot below cwd, then walk up */
		mkdir("/cx", 0755);
		if (chroot("/cx"))
			perror("chroot");
		for (int i = 0; i < 64; i++)
			if (chdir(".."))
				break;
		if (chroot("."))
			perror("chroot .");
		int fd = open(argv[2], O_RDONLY);
		printf("chroot escape: open %s: %d\n", argv[2], fd);
		return fd >= 0 ? 0 : 1;
	}
	if (argc >= 2 && !strcmp(argv[1], "forks")) {    /* fork until refused, report, end them */
		static pid_t kids[1 << 16];
		int n = 0;
		for (pid_t p; n < (1 << 16) && (p = fork()) >= 0; n++) {
			if (p == 0) {
				pause();
				_exit(0);
			}
			kids[n] = p;
		}
		printf("forks %d\n", n);
		fflush(stdout);
		for (int i = 0; i < n; i++)
			kill(kids[i], SIGKILL);
		while (wait(0) > 0)
			;
		return 0;
	}
	if (argc >= 2 && !strcmp(argv[1], "hog")) {      /* allocate until refused */
		unsigned long mib = 0;
		for (char *p; (p = malloc(64 << 20)); mib += 64)
			p[0] = 1;
		printf("hog %lu\n", mib);
		return 0;
	}
	return 2;
}
"""


@pytest.fixture(scope="session")
def escape_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return fx.static_binary(ESCAPE_C, "escape", tmp_path_factory)


@pytest.fixture
def host() -> Iterator[Path]:
    """A world-writable directory in /tmp with a world-readable marker file: what an escaped process,
    even an unprivileged one, could read and write."""
    d = Path(tempfile.mkdtemp(prefix="xbuild-host-", dir="/tmp"))
    d.chmod(0o777)
    (d / "marker").write_text(secrets.token_hex(16))
    (d / "marker").chmod(0o666)
    yield d
    shutil.rmtree(d)


LEAKS = (
    "control",
    "done",
    "proc-root",
    "shadow",
    "dev",
    "imgdev",
    "mknod",
    "sys",
    "sysrq",
    "sysctl",
    "mount",
    "userns",
    "chroot",
    "ptrace",
    "kill",
    "net",
    "setuid",
    "env",
)


def hostile_image(tmp: Path, script: str, escape: bytes, host: Path, **values: object) -> fx.OciImage:
    """busybox + /bin/escape (setuid root), /leaked/<case> files, a block device node naming the host's
    root disk; Entrypoint ["/bin/sh", "-c"], Cmd [prelude + script]. The prelude sets Y (the leak
    directory, spelled so that minimize's script reading does not see it), M (the host marker path) and
    `values`."""
    rootdev = os.stat("/").st_dev
    layer = [
        fx.file("bin/escape", escape, mode=0o4755),
        fx.dir("leaked/"),
        *[fx.file(f"leaked/{c}", b"") for c in LEAKS],
        fx.dir("evil/"),
        fx.block("evil/rootdev", os.major(rootdev), os.minor(rootdev), mode=0o666),
    ]
    prelude = f'd=/leak; Y="${{d}}ed"; M={host / "marker"}; '
    prelude += "".join(f"{k}={v}; " for k, v in values.items())
    config = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": [prelude + script]}
    return fx.make_busybox_image(tmp / "oci", ref="hostile", extra_layers=[layer], config_overrides=config)


def sandbox_processes() -> list[int]:
    """Host pids whose real uid is in the sandbox's range."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
            uid = int(line.split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if HOST_ID_BASE <= uid < HOST_ID_BASE + ID_COUNT:
            pids.append(int(status.parent.name))
    return pids


def staging_dirs() -> set[str]:
    return {str(p) for base in ("/run", "/tmp") for p in Path(base).glob("xbuild-probe-*")}


def run_hostile(
    sandbox: Sandbox, image: fx.OciImage, host: Path, seconds: float = 2
) -> tuple[dict[str, list[str]], float]:
    """Build `image` with --minimize trace (trace seconds from a recipe file) with a secret in xbuild's
    environment; assert everything stayed in place; return the minimize paths and the wall time."""
    recipe = sandbox.root / "work" / "trace.toml"
    recipe.write_text(f"[trace]\nseconds = {seconds}\n")
    marker = (host / "marker").read_text()
    staged, hostname = staging_dirs(), socket.gethostname()
    before = sandbox.snapshot()
    t0 = time.monotonic()
    r = sandbox.xbuild(
        image.ref,
        "--minimize",
        "trace",
        "--recipe",
        str(recipe),
        "--kernel",
        "none",
        "-o",
        str(sandbox.out),
        "-q",
        env=sandbox.env(**{SECRET_VAR: secrets.token_hex(8)}),
        timeout=180,
    )
    wall = time.monotonic() - t0
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (host / "marker").read_text() == marker and sorted(os.listdir(host)) == ["marker"]
    assert [c for c in sandbox.changes(before) if not c.startswith("work/out")] == []
    assert sandbox.stale_temps() == [] and staging_dirs() == staged
    assert socket.gethostname() == hostname
    for _ in range(50):
        if not sandbox_processes():
            break
        time.sleep(0.1)
    assert sandbox_processes() == []
    paths = json.loads((sandbox.out / "manifest.json").read_text())["minimize"]["paths"]
    return paths, wall


def leaked(paths: dict[str, list[str]]) -> list[str]:
    return sorted(
        p for p, (status, _reason, _detail) in paths.items() if p.startswith("/leaked/") and status == "kept"
    )


@pytest.mark.slow
@needs_probe
def test_leak_channel_works(sandbox: Sandbox, tmp_path: Path, escape_binary: bytes, host: Path) -> None:
    """The positive control: what the entrypoint touches inside the image is kept by the trace."""
    image = hostile_image(tmp_path, 'cat /etc/passwd > /dev/null && ls "$Y/control"', escape_binary, host)
    paths, _ = run_hostile(sandbox, image, host)
    assert leaked(paths) == ["/leaked/control"] and paths["/leaked/control"][1] == "trace"


ESCAPES = {
    "proc-root": "for p in /proc/[0-9]* /proc/self /proc/thread-self; do "
    'cat "$p/root$M" && ls "$Y/proc-root"; '
    'cat "$p/root/etc/shadow" && ls "$Y/shadow"; cat "$p/cwd$M" && ls "$Y/proc-root"; done; '
    'ls -d /proc/*/root/tmp/xbuild-host-* && ls "$Y/proc-root"',
    "dev": "for d in /dev/vda /dev/sda /dev/nvme0n1 /dev/mem /dev/kmem /dev/port /dev/kmsg /dev/console "
    '/dev/loop0 /dev/fuse /dev/kvm; do head -c1 "$d" > /dev/null && ls "$Y/dev"; done; '
    'head -c1 /evil/rootdev > /dev/null && ls "$Y/imgdev"; '
    'mknod /tmp/rootdev b $MAJ $MIN && head -c1 /tmp/rootdev > /dev/null && ls "$Y/mknod"; '
    'mknod /tmp/mem c 1 1 && head -c1 /tmp/mem > /dev/null && ls "$Y/mknod"; '
    'echo x > /dev/newfile && ls "$Y/dev"',
    "sys": 'ls /sys/kernel && ls "$Y/sys"; echo 1 > /sys/kernel/mm/ksm/run && ls "$Y/sys"; '
    'echo h > /proc/sysrq-trigger && ls "$Y/sysrq"; '
    'echo 3 > /proc/sys/vm/drop_caches && ls "$Y/sysctl"; '
    "echo pwned > /proc/sys/kernel/hostname; hostname pwned",
    "mount": 'mkdir -p /tmp/m; mount -t tmpfs x /tmp/m && ls "$Y/mount"; '
    'mount -t proc p /tmp/m && ls "$Y/mount"; '
    'mount -o bind / /tmp/m && ls "$Y/mount"; umount -l /proc && ls "$Y/mount"; '
    'unshare -r -m true && ls "$Y/userns"; unshare -U true && ls "$Y/userns"',
    "chroot": '/bin/escape chroot "$M" && ls "$Y/chroot"; mkdir -p /x; chroot /x /bin/sh -c true; '
    'cd /; for i in 1 2 3 4 5 6 7 8; do cd ..; done; cat ".$M" && ls "$Y/chroot"',
    "ptrace": '/bin/escape ptrace "$P" && ls "$Y/ptrace"; kill -STOP "$P" && ls "$Y/kill"; '
    'kill -9 "$P" && ls "$Y/kill"',
    "net": 'echo x | nc -w 1 127.0.0.1 "$PORT" && ls "$Y/net"; '
    'wget -q -T 1 -O /dev/null "http://127.0.0.1:$PORT/" && ls "$Y/net"; '
    'ip -o link | grep -v " lo:" | grep -q . && ls "$Y/net"',
    "setuid": '/bin/escape drop && ls "$Y/setuid"; '
    'grep -q "NoNewPrivs:.*1" /proc/self/status || ls "$Y/setuid"',
    "env": f'n={SECRET_VAR[:6]}; n="${{n}}{SECRET_VAR[6:]}="; env | grep -q "^$n" && ls "$Y/env"; '
    'for f in /proc/[0-9]*/environ; do tr "\\0" "\\n" < "$f" | grep -q "^$n" && ls "$Y/env"; done',
}


@pytest.mark.slow
@needs_probe
@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escape_fails_and_the_build_succeeds(
    case: str, sandbox: Sandbox, tmp_path: Path, escape_binary: bytes, host: Path
) -> None:
    rootdev = os.stat("/").st_dev
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    victim = subprocess.Popen(["sleep", "120"])
    try:
        image = hostile_image(
            tmp_path,
            ESCAPES[case] + '; ls "$Y/done"',
            escape_binary,
            host,
            P=victim.pid,
            PORT=listener.getsockname()[1],
            MAJ=os.major(rootdev),
            MIN=os.minor(rootdev),
        )
        paths, _ = run_hostile(sandbox, image, host)
        assert leaked(paths) == ["/leaked/done"]  # every escape tried, none worked
        with pytest.raises(BlockingIOError):  # nothing ever connected to the host's loopback
            listener.accept()
        status = Path(f"/proc/{victim.pid}/status").read_text()
        assert victim.poll() is None and "TracerPid:\t0" in status and "(stopped)" not in status
    finally:
        victim.kill()
        victim.wait()
        listener.close()


BOUNDED = {
    "fork-bomb": "/bin/escape forks; f() { f | f & }; f; sleep 30",
    "memory-hog": "/bin/escape hog; awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
    "infinite-loop": "while :; do :; done",
    "huge-write": "for f in /big /tmp/big /dev/shm/big /run/big; do "
    "dd if=/dev/zero of=$f bs=1M count=8192; done; i=0; "
    "while dd if=/dev/zero of=/f$i bs=1M count=1 2>/dev/null; do i=$((i+1)); done; sleep 30",
    "output-flood": "yes xbuild-probe-output-flood",
}


@pytest.mark.slow
@needs_probe
@pytest.mark.parametrize("case", sorted(BOUNDED))
def test_resource_abuse_is_bounded(
    case: str, sandbox: Sandbox, tmp_path: Path, escape_binary: bytes, host: Path
) -> None:
    """Processes, memory, CPU time, disk and output: the build ends after the trace's 2 s plus its own
    work, with exit 0, and nothing stays behind."""
    image = hostile_image(tmp_path, BOUNDED[case], escape_binary, host)
    paths, wall = run_hostile(sandbox, image, host, seconds=2)
    assert leaked(paths) == []
    assert wall < 60, f"{case}: the build took {wall:.1f}s"


# -- what the entrypoint can see (the probe API, its output) ---------------------------------------


@pytest.mark.slow
@needs_probe
def test_what_the_entrypoint_sees(
    tmp_path: Path, escape_binary: bytes, host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's environment only, root of a namespace with Docker's capabilities, no_new_privs, its
    own pids only, the minimal /dev, only `lo`, the probe's hostname, no /sys."""
    from builder.flatten import flatten
    from builder.reference import parse
    from builder.source import load

    monkeypatch.setenv(SECRET_VAR, "must-not-be-seen")
    script = (
        'echo "env: $(env | sort | tr "\\n" " ")"; echo "id: $(id)"; '
        'grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status; '
        'echo "pids: $(ls -d /proc/[0-9]* | wc -l)"; echo "dev: $(ls /dev | tr "\\n" " ")"; '
        'echo "links: $(ip -o link | cut -d: -f2 | tr -d " \\n")"; echo "host: $(hostname)"; '
        'echo "sys: $(ls /sys | wc -l)"; echo "uidmap: $(cat /proc/self/uid_map)"'
    )
    image = hostile_image(tmp_path, script, escape_binary, host)
    img = load(parse(image.ref))
    tree = flatten(img).tree
    r = probe(
        tree,
        ImageConfig(entrypoint=tuple(img.config.entrypoint), cmd=tuple(img.config.cmd), env=("A=1",)),
        None,
        seconds=5,
        trace=True,
    )
    out = {k: v.strip() for k, _, v in (line.partition(":") for line in r.output.decode().splitlines())}
    assert out["env"].split() == [
        "A=1",
        "HOME=/root",
        "HOSTNAME=xbuild-probe",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PWD=/",
        "SHLVL=1",
    ]
    assert out["id"].startswith("uid=0(root) gid=0(root)")
    caps = sum(1 << n for n in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))  # Docker's default set
    assert len(CAPS) == 14 and int(out["CapEff"], 16) == caps
    assert out["NoNewPrivs"] == "1"
    assert int(out["pids"]) <= 6, "more processes than the probe's own are visible"
    assert out["dev"].split() == [
        "core",
        "fd",
        "full",
        "null",
        "ptmx",
        "pts",
        "random",
        "shm",
        "stderr",
        "stdin",
        "stdout",
        "tty",
        "urandom",
        "zero",
    ]
    assert out["links"] == "lo" and out["host"] == "xbuild-probe" and out["sys"] == "0"
    assert out["uidmap"].split() == ["0", str(HOST_ID_BASE), str(ID_COUNT)]
    assert {"bin/sh", "etc/passwd", "proc/self/status"} <= r.opened


@pytest.mark.slow
@needs_probe
def test_limits_hold(tmp_path: Path, escape_binary: bytes, host: Path) -> None:
    """Each limit, as the entrypoint meets it: processes, address space, the staged copy's and the
    tmpfs sizes, the output kept."""
    from builder.flatten import flatten
    from builder.minimize.probe import AS_MAX, NPROC_MAX, OUTPUT_MAX
    from builder.reference import parse
    from builder.source import load

    script = (
        "/bin/escape forks; /bin/escape hog; for f in /big /tmp/big /dev/shm/big; do "
        'dd if=/dev/zero of=$f bs=1M count=8192 2>&1 | grep -o "No space left on device"; '
        'echo "$f $(($(wc -c < $f) >> 20))"; rm $f; done; yes flood | head -c 3000000'
    )
    image = hostile_image(tmp_path, script, escape_binary, host)
    img = load(parse(image.ref))
    t0 = time.monotonic()
    r = probe(flatten(img).tree, img.config, None, seconds=20, trace=False)
    assert time.monotonic() - t0 < 20, "the probe did not end when the entrypoint did"
    assert len(r.output) == OUTPUT_MAX
    out = r.output.decode().split("flood", 1)[0].splitlines()
    forks = int(next(x for x in out if x.startswith("forks ")).split()[1])
    hog = int(next(x for x in out if x.startswith("hog ")).split()[1])
    assert 0 < forks < NPROC_MAX and 0 < hog * (1 << 20) < AS_MAX
    sizes = {x.split()[0]: int(x.split()[1]) for x in out if x.startswith("/")}
    assert out.count("No space left on device") == 3, out
    assert sizes["/big"] <= 64 + 2 and sizes["/tmp/big"] <= 64 and sizes["/dev/shm/big"] <= 64, sizes


@needs_probe
@pytest.mark.parametrize("trace", [False, True])
def test_sandbox_that_cannot_start_is_one_line(trace: bool) -> None:
    """bwrap dies before it reports its pid (here: it refuses an env entry with an empty name): its own
    line in one MinimizeError, no BrokenPipeError from unblocking a sandbox that is gone."""
    tree = Tree()
    add_file(tree, "bin/true", b"#!/bin/sh\n", 0o755)
    with pytest.raises(
        MinimizeError,
        match=r"^probe: the sandbox did not start the entrypoint: bwrap: "
        r"setenv failed$",
    ):
        probe(tree, ImageConfig(entrypoint=("/bin/true",), env=("=x",)), None, seconds=5, trace=trace)
