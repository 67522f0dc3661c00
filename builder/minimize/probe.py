"""The probe: run an image's entrypoint on the build host, in a sandbox, to see what it touches.

`probe(tree, config, recipe, seconds, trace)` stages a copy of `tree`, runs its Entrypoint + Cmd with the
environment, argv and working directory the guest's init would give it (builder.guest.guest_config), for
up to `seconds` or until it exits, runs the recipe's network smoke test against it meanwhile, and with
`trace` reports every path of the tree its processes named in a file or exec system call (strace -f).
`--minimize trace` and bench/minimize.py use it.

The entrypoint is untrusted code, so it runs in bubblewrap (bwrap, the sandbox Flatpak uses) with:

  user namespace    root inside is host uid HOST_ID_BASE (ids 0..ID_COUNT-1 inside map to HOST_ID_BASE..,
                    an unused unprivileged range): no capability in the host's namespace, and a breakout
                    is an unprivileged user who owns only the staged copy. bwrap runs as HOST_ID_BASE
                    (setpriv) and we, as host root, write the range maps while it waits (--userns-block-fd).
  capabilities      Docker's default set inside the namespace (CHOWN, SETUID, NET_BIND_SERVICE...), so
                    servers can drop privileges as in a container; no CAP_SYS_ADMIN (no mounts), none in
                    the host namespace; no_new_privs (setuid and file capabilities do nothing).
  mount namespace   the root is the staged copy by pivot_root; fresh /proc of its own pid namespace; /dev
                    is a read-only tmpfs with only null, zero, full, random, urandom, tty, a new devpts and
                    a size-limited /dev/shm; /tmp and /run are size-limited tmpfs; no /sys; the host's
                    mounts are detached, and the staged copy is mounted nodev, so an image's device nodes
                    open nothing.
  pid, ipc, uts,    its own: it sees and signals only its own processes; the network is a namespace with
  net, cgroup       only `lo` (the smoke test joins that namespace from the host side; nothing else does).
  environment       exactly the image's (bwrap --clearenv): nothing of xbuild's environment reaches it.
  limits            setrlimit on the whole process tree (prlimit): RLIMIT_NPROC (counted for every uid of
                    the namespace together, against the creator's limit: a fork bomb stops at NPROC_MAX),
                    RLIMIT_AS per process (AS_MAX), RLIMIT_FSIZE (FSIZE_MAX, also the strace log's cap),
                    RLIMIT_NOFILE, RLIMIT_CORE=0. rlimits rather than a cgroup because they work on every
                    host the same way (cgroup v1 or v2, systemd or not, no delegation) and cannot be raised
                    from inside (that needs CAP_SYS_RESOURCE in the host namespace); the cost: memory is
                    bounded per process, so the total is bounded by NPROC_MAX x AS_MAX, not tighter.
                    Every writable filesystem is a size-limited tmpfs: the staged copy gets the tree's size
                    plus STAGE_SPARE, /tmp, /run and /dev/shm SMALL_TMPFS each. The entrypoint's output
                    kept is OUTPUT_MAX bytes (the rest is read and dropped), time is `seconds`, then every
                    process of its pid namespace is killed.
  trace             strace runs outside the sandbox, as host root, and follows bwrap and everything it
                    starts; its log is a file on a root-only tmpfs of the helper's namespace (outside the
                    sandbox's root), so the entrypoint cannot write it; xbuild holds it open, so it can
                    read it after the namespace is gone. The entrypoint only decides which syscalls and
                    strings appear there, and the paths read back are only ever looked up in the Tree.
  staging           a helper with its own private mount namespace (unshare --mount, pdeathsig) mounts
                    the tmpfs over /run there (the host's mount table never shows it); xbuild writes the
                    copy through /proc/HELPER/root, then the helper execs the launch chain. Nothing is
                    created on the host's filesystems: no mountpoint, no temp directory.
  lifetime          if xbuild dies, even by SIGKILL, the helper-then-strace gets SIGKILL (setpriv
                    --pdeathsig) and bwrap then kills the sandbox (--die-with-parent); with the namespace's
                    last process the kernel frees the tmpfs. A SIGTERM to xbuild is an interrupt (the CLI
                    turns it into KeyboardInterrupt): the probe stops the sandbox on its way out.

Host needs (check_probe_host): root, bwrap (Debian package bubblewrap), strace for trace, util-linux's
setpriv, prlimit, nsenter and unshare, mount, and user namespaces enabled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from ..errors import MinimizeError
from ..guest import guest_config
from ..host import check, missing_packages
from ..image import ImageConfig
from ..recipes import Recipe, Smoke
from ..run.warm_tail import proc_starttime  # standard library only: it runs as a script too
from ..tree import DIR, FILE, SYMLINK, ContentReader, Inode, Tree, entries, split

HOST_ID_BASE = 1_878_982_656  # 0x6FFF0000: the top 64 Ki of systemd's container range (UIDS-GIDS.md)
ID_COUNT = 65536
NPROC_MAX = 256
AS_MAX = 4 << 30
FSIZE_MAX = 256 << 20
NOFILE_MAX = 4096
OUTPUT_MAX = 1 << 20
STAGE_SPARE = 64 << 20
SMALL_TMPFS = 64 << 20
HOSTNAME = "xbuild-probe"
# Docker's default capability set (moby oci/caps/defaults.go), granted inside the user namespace only
CAPS = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
)
TOOLS = ("bwrap", "setpriv", "prlimit", "nsenter", "unshare", "mount")  # packages: builder/host.py
_SYSCALL = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)\(?(.*)$")
_FILE_CALLS = {
    "open",
    "openat",
    "openat2",
    "creat",
    "execve",
    "execveat",
    "stat",
    "lstat",
    "newfstatat",
    "statx",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "chdir",
    "truncate",
    "uselib",
}


@dataclass(frozen=True)
class ProbeResult:
    output: bytes  # the entrypoint's stdout + stderr (the first OUTPUT_MAX bytes)
    opened: frozenset[str]  # tree paths its processes touched (trace only)
    smoke: tuple[bool, str] | None  # the recipe's smoke test, run while it was up
    log_full: bool = False  # the strace log reached FSIZE_MAX: the trace stopped there


def check_probe_host(trace: bool) -> None:
    """MinimizeError (one line naming what to install) unless this host can run the probe."""
    what = "trace" if trace else "smoke"
    missing = sorted(missing_packages(check(TOOLS + (("strace",) if trace else ()))))
    if os.geteuid() != 0:
        why = "(not root): it maps the sandbox's user ids as root"
    elif missing:
        why = "(install the Debian package" + ("s " if len(missing) > 1 else " ") + ", ".join(missing) + ")"
    elif _max_user_namespaces() == 0:
        why = "(user namespaces are disabled: sysctl user.max_user_namespaces=0)"
    else:
        return
    raise MinimizeError(f"the {what} probe cannot run on this host {why}; use --minimize auto")


def _max_user_namespaces() -> int:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        return 0


def host_id(inside: int) -> int:
    """The host uid/gid an id of the sandbox is: unmapped ids (>= ID_COUNT) become nobody (65534)."""
    return HOST_ID_BASE + (inside if 0 <= inside < ID_COUNT else 65534)


def extract(tree: Tree, dest: Path, id_base: int | None = None) -> None:
    """Write `tree` under `dest` (a new directory): files, symlinks, hardlinks, devices, modes, owners.
    Tree paths never pass through a symlink, so nothing can land outside `dest`. With `id_base` (root
    only), owners are the sandbox's host ids (host_id) instead of the image's."""
    dest.mkdir(parents=True)
    root = os.geteuid() == 0

    def owner(node: Inode) -> tuple[int, int]:
        return (node.uid, node.gid) if id_base is None else (host_id(node.uid), host_id(node.gid))

    written: set[str] = set()  # paths of a hardlink group's first name, once made (not a skipped device)
    dirs: list[tuple[str, Inode]] = []
    with ContentReader() as contents:
        for e in entries(tree):
            path, node = e.path, e.node
            full = os.path.join(dest, path) if path else str(dest)
            if node.kind == DIR:
                if path:
                    os.mkdir(full)
                dirs.append((full, node))
                continue
            if node.kind == SYMLINK:
                os.symlink(node.target, full)
                if root:
                    os.lchown(full, *owner(node))
                continue
            if e.leader in written:
                os.link(os.path.join(dest, e.leader), full)
                continue
            if node.kind == FILE:
                fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    for chunk in contents.chunks(node):
                        os.write(fd, chunk)
                finally:
                    os.close(fd)
            else:
                kind = {"char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}[node.kind]
                if not root and node.kind != "fifo":
                    continue
                os.mknod(full, kind | 0o600, os.makedev(*node.rdev))
            if root:
                os.chown(full, *owner(node))
            os.chmod(full, node.mode & 0o7777)
            written.add(path)
    for full, node in reversed(dirs):
        if root:
            os.chown(full, *owner(node))
        os.chmod(full, node.mode & 0o7777)


def probe(
    tree: Tree, config: ImageConfig, recipe: Recipe | None, seconds: float = 5.0, trace: bool = False
) -> ProbeResult:
    """Run `tree`'s entrypoint in the sandbox (module doc) for up to `seconds` or until it exits, with
    the recipe's network smoke test run against it meanwhile (without `trace`, the probe ends when the
    smoke test has its answer); with `trace`, under strace -f, reporting every tree path its processes
    named. MinimizeError if the host cannot run it, the sandbox cannot start or the entrypoint cannot
    be executed; anything the entrypoint itself does is its own result. An interrupt meanwhile (Ctrl-C, or the
    CLI's SIGTERM handler) stops the sandbox on its way out."""
    check_probe_host(trace)
    gc = guest_config(config, tree, HOSTNAME)
    return _run(tree, gc.argv, gc.env, gc.cwd, recipe, seconds, trace)


def _stage_base() -> str:
    """The directory the probe's tmpfs is mounted over inside its private mount namespace (the host's
    stays as it is): /run, which bwrap does not use itself (its scratch root is /tmp), else /tmp."""
    return "/run" if os.path.isdir("/run") else "/tmp"


def _stage_size(tree: Tree) -> tuple[int, int]:
    """(bytes, inodes) of the staged copy's tmpfs: the tree plus STAGE_SPARE for what the entrypoint
    writes."""
    size, inodes = STAGE_SPARE, 1024
    for _path, node in tree.walk():
        inodes += 1
        size += 4096 + (-(-node.size // 4096) * 4096 if node.kind == FILE else 0)
    return size, inodes * 2


def _helper_script(base: str, tree: Tree) -> str:
    """The shell run in the probe's private mount namespace (`unshare --mount`): a root-only tmpfs over
    `base` for the strace log (base/log, up to FSIZE_MAX), the staged copy's own tmpfs at base/stage
    (sized for `tree`; nodev, so an image's device nodes open nothing; nosuid), "ready" on stdout, then
    wait for a line on stdin (xbuild has staged the copy) and exec the launch chain ("$@") with its
    output on stderr. Nothing of this is visible in the host's mount namespace, and it all goes away
    with the last process of the namespace."""
    size, inodes = _stage_size(tree)
    ids = f"uid={HOST_ID_BASE},gid={HOST_ID_BASE}"
    return (
        f"mount -t tmpfs -o size={FSIZE_MAX + (1 << 20)},nr_inodes=64,mode=0711,nodev,nosuid,noexec "
        f"xbuild-probe {base} && mkdir -m 0700 {base}/log && mkdir -m 0755 {base}/stage && "
        f"mount -t tmpfs -o size={size},nr_inodes={inodes},mode=0755,{ids},nodev,nosuid "
        f'xbuild-probe {base}/stage && echo ready && read go && exec "$@" </dev/null >&2'
    )


def _mount_points(root: Path) -> None:
    """/proc, /dev, /tmp, /run of the staged copy as plain empty directories for bwrap to mount on (an
    image may ship them as symlinks or files; the guest's init mounts over them too)."""
    for name in ("proc", "dev", "tmp", "run"):
        p = root / name
        if p.is_symlink() or not p.is_dir():
            if p.is_symlink() or p.exists():
                p.unlink()
            p.mkdir(0o755)
            os.chown(p, HOST_ID_BASE, HOST_ID_BASE)


def _bwrap_args(
    root: str, argv: tuple[str, ...], env: tuple[str, ...], cwd: str, block_fd: int, info_fd: int
) -> list[str]:
    args = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-user",
        "--userns-block-fd",
        str(block_fd),
        "--info-fd",
        str(info_fd),
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--hostname",
        HOSTNAME,
        "--die-with-parent",
        "--new-session",
        "--bind",
        root,
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(SMALL_TMPFS),
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(SMALL_TMPFS),
        "--tmpfs",
        "/tmp",
        "--perms",
        "0755",
        "--size",
        str(SMALL_TMPFS),
        "--tmpfs",
        "/run",
        "--cap-drop",
        "ALL",
    ]
    for cap in CAPS:
        args += ["--cap-add", f"CAP_{cap}"]
    args.append("--clearenv")
    for kv in env:
        key, _, value = kv.partition("=")
        args += ["--setenv", key, value]
    return args + ["--chdir", cwd, "--", *argv]


def _run(
    tree: Tree,
    argv: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str,
    recipe: Recipe | None,
    seconds: float,
    trace: bool,
) -> ProbeResult:
    """Start the helper (its own mount namespace, _helper_script), stage `tree` into its tmpfs through
    /proc/PID/root, let it exec the launch chain, and collect what the sandbox did. Nothing is created
    on the host's filesystems: if xbuild dies (even by SIGKILL), the chain dies with it (pdeathsig,
    --die-with-parent) and the kernel frees the namespace and its tmpfs with its last process."""
    base = _stage_base()
    log = f"{base}/log/strace.log"
    block_r, block_w = os.pipe()
    info_r, info_w = os.pipe()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    chain = [
        "prlimit",
        f"--nproc={NPROC_MAX}",
        f"--as={AS_MAX}",
        f"--fsize={FSIZE_MAX}",
        f"--nofile={NOFILE_MAX}",
        "--core=0",
        "--",
    ]
    if trace:
        chain += ["strace", "-f", "-qq", "-s", "4096", "-e", "trace=%file,%process", "-o", log]
    chain += [
        "setpriv",
        f"--reuid={HOST_ID_BASE}",
        f"--regid={HOST_ID_BASE}",
        "--clear-groups",
        "--",
        *_bwrap_args(f"{base}/stage/root", argv, env, cwd, block_r, info_w),
    ]
    cmd = [
        "setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        _helper_script(base, tree),
        "sh",
        *chain,
    ]
    end = time.monotonic() + seconds
    # stdout/stderr: a pipe the sandbox's root owns, so that reopening /dev/stderr works as in a container
    out_r, out_w = os.pipe()
    os.fchown(out_w, HOST_ID_BASE, HOST_ID_BASE)
    proc = subprocess.Popen(
        cmd,
        stdin=go_r,
        stdout=ready_w,
        stderr=out_w,
        pass_fds=(block_r, info_w),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    for fd in (block_r, info_w, out_w, go_r, ready_w):
        os.close(fd)
    out = bytearray()
    reader = threading.Thread(target=_read_capped, args=(os.fdopen(out_r, "rb"), out), daemon=True)
    reader.start()
    smoke = None
    child = None
    log_fd = -1
    try:
        try:
            if not _ready(ready_r):
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # alive but silent for 60 s: hung
                    proc.kill()  # the chain dies with it (pdeathsig)
                    proc.wait()
                reader.join(timeout=10)
                why = (bytes(out).decode("utf-8", "replace").strip().splitlines() or ["it ended"])[-1]
                raise MinimizeError(f"probe: cannot mount its tmpfs: {why}")
            try:
                root = Path(f"/proc/{proc.pid}/root{base}/stage/root")  # our unreaped child: a stable pid
                extract(tree, root, HOST_ID_BASE)
                _mount_points(root)
                if trace:  # held open: the log outlives the namespace, which ends with the chain
                    log_fd = os.open(
                        f"/proc/{proc.pid}/root{log}",
                        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                    )
            except OSError as e:
                raise MinimizeError(f"probe: cannot stage the image on this host ({e})") from None
            os.write(go_w, b"go\n")
            os.close(go_w)
            go_w = -1
            child = _sandbox_pid(info_r)
            if child is not None:
                _map_ids(child)
            with contextlib.suppress(BrokenPipeError):  # bwrap ended before --info-fd: its line says why
                os.write(block_w, b"1")
            os.close(block_w)
            block_w = -1
            if child is not None and recipe and recipe.smoke and recipe.smoke.kind != "console":
                smoke = _smoke_in_netns(child, recipe, recipe.smoke, seconds)
                if not trace:
                    end = 0
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, end - time.monotonic()))
        finally:
            for fd in (go_w, block_w, info_r, ready_r):
                if fd >= 0:
                    os.close(fd)
            if proc.poll() is None:  # our own child, not yet reaped: its pid is still ours to kill
                proc.kill()  # the chain dies with it (pdeathsig, --die-with-parent)
            proc.wait()
            _wait_gone(child)
            reader.join(timeout=10)
        output = bytes(out)
        lines = output.decode("utf-8", "replace").splitlines()
        if lines and lines[0].startswith("bwrap: ") and proc.returncode == 1:
            if "Exec format error" in lines[0]:
                raise MinimizeError("probe: the host cannot run the entrypoint: " + lines[0])
            raise MinimizeError(f"probe: the sandbox did not start the entrypoint: {lines[0]}")
        opened: set[str] = set()
        full = False
        if log_fd >= 0:
            with open(log_fd, encoding="utf-8", errors="replace", closefd=False) as f:
                full = os.fstat(log_fd).st_size >= FSIZE_MAX
                opened = traced_paths(f, cwd, {child} if child else set())
        return ProbeResult(output, frozenset(opened), smoke, full)
    finally:
        if log_fd >= 0:
            os.close(log_fd)


def _ready(ready_r: int, timeout: float = 60.0) -> bool:
    """Whether the helper said "ready" (its tmpfs are mounted) before it ended or `timeout` passed."""
    return _read_until(ready_r, lambda data: data.endswith(b"\n"), timeout) == b"ready\n"


def _read_until(fd: int, complete: Callable[[bytes], bool], timeout: float) -> bytes | None:
    """What `fd` gives until `complete(data)` holds, or None if it ends or `timeout` passes first."""
    data = b""
    end = time.monotonic() + timeout
    while not complete(data):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data


def _read_capped(stream: IO[bytes], out: bytearray) -> None:
    """Read `stream` to its end, keeping the first OUTPUT_MAX bytes in `out`; then close it."""
    with stream:
        while chunk := stream.read(65536):
            if len(out) < OUTPUT_MAX:
                out += chunk[: OUTPUT_MAX - len(out)]


def _wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    """Wait until the sandbox's pid 1 (SIGKILLed through --die-with-parent once strace or bwrap died)
    is gone or a zombie: a pid namespace's init only becomes a zombie after the kernel has killed and
    reaped every other process of its namespace. (Its reaper is the host's init, once bwrap is gone;
    some inits reap only every few seconds.)"""
    end = time.monotonic() + timeout
    while pid is not None and proc_starttime(pid) is not None and time.monotonic() < end:
        time.sleep(0.02)


def _sandbox_pid(info_r: int, timeout: float = 30.0) -> int | None:
    """The host pid of the sandbox's pid 1 from bwrap's --info-fd JSON, or None if bwrap ended first."""
    data = _read_until(info_r, lambda data: data.rstrip().endswith(b"}"), timeout)
    if data is None:
        return None
    pid = json.loads(data).get("child-pid")
    return pid if isinstance(pid, int) and pid > 0 else None


def _map_ids(pid: int) -> None:
    """Map ids 0..ID_COUNT-1 of the sandbox's user namespace to HOST_ID_BASE.. and forbid user namespaces
    inside it (user.max_user_namespaces=0 in its namespace: raising it again needs CAP_SYS_RESOURCE,
    which the sandbox lacks), so the entrypoint gets no namespace where it could mount or hold other
    capabilities. bwrap waits for this before it sets up the sandbox."""
    try:
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{pid}/{name}").write_text(f"0 {HOST_ID_BASE} {ID_COUNT}\n")
    except OSError:
        return  # bwrap is gone; its own message says why
    r = subprocess.run(
        [
            "nsenter",
            f"--user=/proc/{pid}/ns/user",
            "--",
            "/bin/sh",
            "-c",
            "echo 0 > /proc/sys/user/max_user_namespaces",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise MinimizeError(
            "probe: cannot disable user namespaces inside the sandbox: "
            + (r.stderr.strip().splitlines() or ["nsenter failed"])[-1]
        )


def _smoke_in_netns(pid: int, recipe: Recipe, smoke: Smoke, seconds: float) -> tuple[bool, str]:
    """Run the recipe's http/tcp smoke test from inside the sandbox's network namespace (nsenter --net
    only: the test process keeps the host's files; its memory is capped with prlimit)."""
    spec = dict(asdict(smoke), send=smoke.send.hex())
    repo = str(Path(__file__).resolve().parents[2])
    cmd = [
        "nsenter",
        f"--net=/proc/{pid}/ns/net",
        "--",
        "prlimit",
        f"--as={1 << 30}",
        "--",
        sys.executable,
        "-m",
        "builder.minimize.smoke",
        json.dumps({"name": recipe.name, "smoke": spec, "seconds": seconds}),
    ]
    try:
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            cwd=repo,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": repo},
        )
    except subprocess.TimeoutExpired:
        return False, "the smoke test did not finish"
    try:
        ok, msg = json.loads(r.stdout.strip().splitlines()[-1])
        return bool(ok), str(msg)
    except (ValueError, IndexError):
        return False, "the smoke test failed: " + (r.stderr.strip().splitlines() or ["no output"])[-1]


def traced_paths(lines: Iterable[str], cwd: str, skip: set[int]) -> set[str]:
    """Tree paths from an strace -f log of the probe: every path named in a file or exec call, from the
    first execve of a process other than the launcher (the log's first pid: setpriv, then bwrap) and the
    pids in `skip` (the sandbox's pid 1, bwrap's reaper), i.e. from the entrypoint's exec on. Relative
    paths are taken relative to `cwd`."""
    launcher = None
    started = False
    paths: set[str] = set()
    base = "/".join(split(cwd or "/"))
    for line in lines:
        mt = _SYSCALL.match(line)
        if not mt:
            continue
        pid, call, rest = int(mt.group(1)), mt.group(2), mt.group(3)
        if launcher is None:
            launcher = pid
        if pid == launcher or pid in skip:
            continue
        if not started:
            if call not in ("execve", "execveat"):
                continue
            started = True
        if call in _FILE_CALLS:
            s = re.search(r'"((?:[^"\\]|\\.)*)"', rest)
            if s:
                p = s.group(1).encode().decode("unicode_escape", "replace")
                paths.add("/".join(split(p if p.startswith("/") else f"{base}/{p}")))
    return {p for p in paths if p}
