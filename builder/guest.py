"""The guest config: what the init (initramfs/init.c) runs, resolved at build time like `docker run`.

`guest_config(image config, tree, hostname)` applies the OCI image-spec's conversion rules (conversion.md)
and runc's/docker's user resolution against the image's own /etc/passwd and /etc/group:

- argv = Entrypoint + Cmd (Cmd alone when there is no Entrypoint); neither → ConfigError.
- env = docker's: `PATH=<default>`, `HOSTNAME=<hostname>`, then the image's Env replacing by key or
  appended (a bare `KEY` removes it), then `HOME=<passwd home or />` when there is still no HOME.
- cwd = WorkingDir, "/" when empty; made absolute and normalised. The init creates it if missing.
- User: "", name, uid, name:group, uid:gid, name:gid, uid:group (runc's GetExecUser):
  * empty → uid 0, gid 0 (and root's passwd entry, if any, for home and groups);
  * a numeric user is always a uid (no passwd entry needed: gid 0, home "/"); a name must exist in
    /etc/passwd, else ConfigError; the passwd entry gives the gid and home;
  * an explicit group replaces the gid: a numeric group is always a gid, a name must exist in /etc/group;
  * supplementary groups: the primary gid first, then, only when no group was given explicitly, every
    /etc/group entry listing the user's name (file order, no duplicates). Including the primary gid is
    what containerd/moby do since GHSA-hmfx-3pcx-653p (CVE-2023-25173).
- StopSignal: a number or a name with or without SIG (any case), SIGRTMIN+n / RTMAX-n; empty → SIGTERM.
- Healthcheck (Docker's; build merges `--health-*` over it as dockerd does): NONE or none → no probe;
  CMD runs its words, CMD-SHELL runs them after the image's Shell (default `/bin/sh -c`), as the
  program's user, in its working directory, with its environment; Docker's defaults (interval 30 s,
  timeout 30 s, start period 0, start interval 5 s, retries 3) are filled in here, durations rounded up
  to milliseconds for the init.

`install(tree, gc, init)` puts the init at /.xbuild/init, the encoded config at /.xbuild/config, a /init
symlink when the image has none, and /dev/console so the kernel hands init a console. The installed config
ends with the tree's census (`census`: `files` and `pages` records): the init compares it with what the
root tmpfs says it holds before it runs anything and refuses to go on with less (a partial unpack, see
builder/cpio.py's `last`).
The boot command line must carry INIT_CMDLINE. For `--format disk` the same installed tree goes on the disk
and `boot_tree(tree)` is the initramfs: the init, its config (with `root` records) and /dev/console.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from .errors import ConfigError
from .image import ImageConfig
from .text import is_decimal
from .tree import CHAR, DIR, Inode, Tree, directory, regular

INIT_PATH = ".xbuild/init"
CONFIG_PATH = ".xbuild/config"
INIT_CMDLINE = "rdinit=/.xbuild/init"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GRACE_S = 10
ROOT_DEVICES = ("/dev/vda", "/dev/xvda")  # QEMU virtio-blk, Xen blkfront: the first that exists is mounted
DEFAULT_ROOT_WAIT_S = 10
MAGIC = ("xbuild-guest-config", "1")

# Linux x86-64 signal numbers (as docker's signal map; SIGRTMIN is 34 there as in glibc)
SIGNALS = {
    "HUP": 1,
    "INT": 2,
    "QUIT": 3,
    "ILL": 4,
    "TRAP": 5,
    "ABRT": 6,
    "IOT": 6,
    "BUS": 7,
    "FPE": 8,
    "KILL": 9,
    "USR1": 10,
    "SEGV": 11,
    "USR2": 12,
    "PIPE": 13,
    "ALRM": 14,
    "TERM": 15,
    "STKFLT": 16,
    "CHLD": 17,
    "CLD": 17,
    "CONT": 18,
    "STOP": 19,
    "TSTP": 20,
    "TTIN": 21,
    "TTOU": 22,
    "URG": 23,
    "XCPU": 24,
    "XFSZ": 25,
    "VTALRM": 26,
    "PROF": 27,
    "WINCH": 28,
    "IO": 29,
    "POLL": 29,
    "PWR": 30,
    "SYS": 31,
    "UNUSED": 31,
}
SIGRTMIN, SIGRTMAX = 34, 64
DEFAULT_SHELL = ("/bin/sh", "-c")
# Docker's defaults (moby daemon/health.go), in ms
HEALTH_INTERVAL_MS, HEALTH_TIMEOUT_MS, HEALTH_START_PERIOD_MS = 30000, 30000, 0
HEALTH_START_INTERVAL_MS, HEALTH_RETRIES = 5000, 3


@dataclass(frozen=True)
class Health:
    """The health probe the init runs: `argv` exec'd (CMD-SHELL already behind its shell), Docker's
    defaults applied. The init prints `xbuild: health: healthy|unhealthy` on each change of state."""

    argv: tuple[str, ...]
    interval_ms: int = HEALTH_INTERVAL_MS
    timeout_ms: int = HEALTH_TIMEOUT_MS
    start_period_ms: int = HEALTH_START_PERIOD_MS
    start_interval_ms: int = HEALTH_START_INTERVAL_MS
    retries: int = HEALTH_RETRIES

    def records(self) -> list[tuple[str, str]]:
        return [("health", a) for a in self.argv] + [
            ("healthinterval", str(self.interval_ms)),
            ("healthtimeout", str(self.timeout_ms)),
            ("healthstart", str(self.start_period_ms)),
            ("healthstartint", str(self.start_interval_ms)),
            ("healthretries", str(self.retries)),
        ]


def _ms(ns: int, default_ms: int) -> int:
    """Nanoseconds (0 = default) as whole milliseconds, rounded up."""
    return -(-ns // 1_000_000) if ns else default_ms


def health_probe(config: ImageConfig) -> Health | None:
    """The probe for the config's Healthcheck (None when it has none or NONE)."""
    hc = config.healthcheck
    if hc is None or not hc.test or hc.disabled:
        return None
    argv = hc.test[1:] if hc.test[0] == "CMD" else (config.shell or DEFAULT_SHELL) + hc.test[1:]
    return Health(
        argv,
        _ms(hc.interval_ns, HEALTH_INTERVAL_MS),
        _ms(hc.timeout_ns, HEALTH_TIMEOUT_MS),
        _ms(hc.start_period_ns, HEALTH_START_PERIOD_MS),
        _ms(hc.start_interval_ns, HEALTH_START_INTERVAL_MS),
        hc.retries or HEALTH_RETRIES,
    )


@dataclass(frozen=True)
class GuestConfig:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    stop_signal: int
    hostname: str
    cmd_index: int = 0  # argv[cmd_index:] is Cmd: what `-- WORDS` on the command line replaces
    grace_s: int = DEFAULT_GRACE_S
    root_devices: tuple[str, ...] = ()  # `--format disk`: mount the first of these as / (ext4)
    root_mode: str = "rw"  # ro | rw
    root_wait_s: int = DEFAULT_ROOT_WAIT_S
    health: Health | None = None  # the image's HEALTHCHECK, if any

    def encode(self) -> bytes:
        """`KEY NUL VALUE NUL` records (see init.c's header comment)."""
        recs: list[tuple[str, str]] = [MAGIC]
        recs += [("arg", a) for a in self.argv]
        recs.append(("cmd", str(self.cmd_index)))
        recs += [("env", e) for e in self.env]
        recs += [("cwd", self.cwd), ("uid", str(self.uid)), ("gid", str(self.gid))]
        recs += [("group", str(g)) for g in self.groups]
        recs += [
            ("stopsig", str(self.stop_signal)),
            ("hostname", self.hostname),
            ("grace", str(self.grace_s)),
        ]
        if self.root_devices:
            recs += [("root", d) for d in self.root_devices]
            recs += [("rootmode", self.root_mode), ("rootwait", str(self.root_wait_s))]
        if self.health:
            recs += self.health.records()
        out = bytearray()
        for k, v in recs:
            try:
                b = v.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800" in the image config's JSON
                raise ConfigError(f"{k} value is not valid Unicode (a lone surrogate): {v!r}") from None
            if b"\0" in b:
                raise ConfigError(f"{k} value contains a NUL byte: {v!r}")
            out += k.encode() + b"\0" + b + b"\0"
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> GuestConfig:
        """The inverse of encode (for tests and `explain`); ConfigError for anything encode cannot give."""
        parts = data.split(b"\0")
        if len(parts) % 2 != 1 or parts[-1] != b"":
            raise ConfigError("guest config: truncated record")
        try:
            recs = [
                (parts[i].decode(), parts[i + 1].decode("utf-8", "surrogateescape"))
                for i in range(0, len(parts) - 1, 2)
            ]
        except UnicodeDecodeError:
            raise ConfigError("guest config: a key is not UTF-8") from None
        if not recs or recs[0] != MAGIC:
            raise ConfigError("guest config: bad magic")
        f: dict[str, list[str]] = {}
        for k, v in recs[1:]:
            f.setdefault(k, []).append(v)

        def one(k: str, default: str) -> str:
            return f.get(k, [default])[-1]

        def num(v: str) -> int:
            if not is_decimal(v):
                raise ConfigError(f"guest config: {v!r} is not a number")
            return int(v)

        health = (
            Health(
                tuple(f["health"]),
                num(one("healthinterval", str(HEALTH_INTERVAL_MS))),
                num(one("healthtimeout", str(HEALTH_TIMEOUT_MS))),
                num(one("healthstart", str(HEALTH_START_PERIOD_MS))),
                num(one("healthstartint", str(HEALTH_START_INTERVAL_MS))),
                num(one("healthretries", str(HEALTH_RETRIES))),
            )
            if "health" in f
            else None
        )
        return cls(
            tuple(f.get("arg", [])),
            tuple(f.get("env", [])),
            one("cwd", "/"),
            num(one("uid", "0")),
            num(one("gid", "0")),
            tuple(num(g) for g in f.get("group", [])),
            num(one("stopsig", "15")),
            one("hostname", ""),
            num(one("cmd", "0")),
            num(one("grace", str(DEFAULT_GRACE_S))),
            tuple(f.get("root", [])),
            one("rootmode", "rw"),
            num(one("rootwait", str(DEFAULT_ROOT_WAIT_S))),
            health,
        )


# ------------------------------------------------------------------------------------------- parsing


def parse_signal(text: str) -> int:
    """A StopSignal value as docker parses it: '9', 'SIGQUIT', 'quit', 'SIGRTMIN+3'; '' → SIGTERM."""
    s = text.strip()
    if not s:
        return SIGNALS["TERM"]
    if is_decimal(s):
        n = int(s)
        if 1 <= n <= SIGRTMAX:
            return n
        raise ConfigError(f"invalid StopSignal {text!r}: no signal {n}")
    name = s.upper()
    if name.startswith("SIG"):
        name = name[3:]
    if name in SIGNALS:
        return SIGNALS[name]
    for base, sign, start in (("RTMIN", 1, SIGRTMIN), ("RTMAX", -1, SIGRTMAX)):
        if name == base:
            return start
        if name.startswith(base + ("+" if sign > 0 else "-")) and is_decimal(name[len(base) + 1 :]):
            n = start + sign * int(name[len(base) + 1 :])
            if SIGRTMIN <= n <= SIGRTMAX:
                return n
    raise ConfigError(f"invalid StopSignal {text!r}")


@dataclass(frozen=True)
class _Passwd:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _Group:
    name: str
    gid: int
    members: tuple[str, ...]


def _read(tree: Tree, path: str) -> list[list[str]]:
    try:
        text = tree.read(path).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rows.append(line.split(":"))
    return rows


def _passwd(tree: Tree) -> list[_Passwd]:
    out = []
    for f in _read(tree, "etc/passwd"):
        if len(f) < 4 or not is_decimal(f[2]) or not is_decimal(f[3]):
            continue  # runc skips what it cannot parse, too
        out.append(_Passwd(f[0], int(f[2]), int(f[3]), f[5] if len(f) > 5 else ""))
    return out


def _groups(tree: Tree) -> list[_Group]:
    out = []
    for f in _read(tree, "etc/group"):
        if len(f) < 3 or not is_decimal(f[2]):
            continue
        members = tuple(m.strip() for m in f[3].split(",") if m.strip()) if len(f) > 3 else ()
        out.append(_Group(f[0], int(f[2]), members))
    return out


def resolve_user(user: str, tree: Tree) -> tuple[int, int, tuple[int, ...], str]:
    """(uid, gid, supplementary groups, home) for an OCI `User` value, from the tree's passwd/group."""
    user_arg, _, group_arg = user.partition(":")
    has_group = ":" in user
    if has_group and not group_arg:
        raise ConfigError(f"invalid User {user!r}: empty group")
    if user.startswith(":"):
        raise ConfigError(f"invalid User {user!r}: empty user")
    uid, gid, home, name = 0, 0, "/", ""
    entries = _passwd(tree)
    if not user_arg:
        match = next((p for p in entries if p.uid == 0), None)
    elif is_decimal(user_arg):
        uid = int(user_arg)
        match = next((p for p in entries if p.uid == uid), None)
    else:
        match = next((p for p in entries if p.name == user_arg), None)
        if match is None:
            raise ConfigError(
                f"cannot resolve User {user!r}: no user {user_arg!r} in the image's /etc/passwd"
            )
    if match is not None:
        uid, gid, name = match.uid, match.gid, match.name
        home = match.home or "/"
    groups = _groups(tree)
    extra: list[int] = []
    if has_group:
        if is_decimal(group_arg):
            gid = int(group_arg)
        else:
            grp = next((g for g in groups if g.name == group_arg), None)
            if grp is None:
                raise ConfigError(
                    f"cannot resolve User {user!r}: no group {group_arg!r} in the image's /etc/group"
                )
            gid = grp.gid
    elif name:
        extra = [g.gid for g in groups if name in g.members]
    if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
        raise ConfigError(f"invalid User {user!r}: id out of range")
    sup: list[int] = []
    for g in [gid, *extra]:
        if g not in sup:
            sup.append(g)
    return uid, gid, tuple(sup), home


def merge_env(base: list[str], updates: tuple[str, ...] | list[str]) -> list[str]:
    """Docker's ReplaceOrAppendEnvValues: KEY=VALUE replaces KEY or is appended; bare KEY removes it."""
    env = list(base)
    for kv in updates:
        key, eq, _ = kv.partition("=")
        idx = next((i for i, e in enumerate(env) if e.partition("=")[0] == key), None)
        if not eq:
            if idx is not None:
                del env[idx]
        elif idx is None:
            env.append(kv)
        else:
            env[idx] = kv
    return env


def guest_config(config: ImageConfig, tree: Tree, hostname: str) -> GuestConfig:
    """Resolve the image config against the image's files into what init runs."""
    argv = tuple(config.entrypoint) + tuple(config.cmd)
    if not argv:
        raise ConfigError("the image has neither Entrypoint nor Cmd: nothing to run")
    if not argv[0]:
        raise ConfigError("the image's command starts with an empty word")
    uid, gid, groups, home = resolve_user(config.user, tree)
    env = merge_env([f"PATH={DEFAULT_PATH}", f"HOSTNAME={hostname}"], config.env)
    if not any(e.partition("=")[0] == "HOME" for e in env):
        env.append(f"HOME={home}")
    cwd = posixpath.normpath("/" + (config.working_dir or "/"))
    cwd = "/" + cwd.lstrip("/")
    return GuestConfig(
        argv=argv,
        env=tuple(env),
        cwd=cwd,
        uid=uid,
        gid=gid,
        groups=groups,
        stop_signal=parse_signal(config.stop_signal),
        hostname=hostname,
        cmd_index=len(config.entrypoint),
        health=health_probe(config),
    )


@dataclass(frozen=True)
class Census:
    """What the initramfs holds: `files` paths (the root, /.xbuild and every hardlink included) and
    `pages`, the pages its files and long symlinks fill in a tmpfs (builder/memory.py's tree data), the
    config's own excluded: what init.c compares with the root tmpfs's accounting. Encoded as the config's
    `files` and `pages` records."""

    files: int
    pages: int

    def records(self) -> bytes:
        return b"files\0%d\0pages\0%d\0" % (self.files, self.pages)


def census(tree: Tree) -> Census:
    """The census of an installed `tree` whose config holds no census yet (its pages are not counted)."""
    from .memory import PAGE, tree_bytes

    config = tree.lookup(CONFIG_PATH)
    own = -(-config.size // PAGE) if config is not None else 0
    return Census(sum(1 for _ in tree.walk()), tree_bytes(tree)[1] // PAGE - own)


def install(tree: Tree, gc: GuestConfig, init: bytes) -> None:
    """Add the init, its config, /init (unless the image has its own) and /dev/console to the tree.

    /.xbuild belongs to the init: whatever the image has there (a file, a symlink, a directory with its
    own modes and files) is replaced by a root-owned 0755 directory holding only the init and its
    config, as a runtime's bind mount of its init shadows what the image has at that path. /dev/console
    is added where /dev is (or resolves to) a directory, or when the image has no /dev at all.
    """
    assert tree.root.children is not None
    xbuild = tree.root.children[INIT_PATH.split("/")[0]] = directory(0o755)
    assert xbuild.children is not None
    xbuild.children[INIT_PATH.split("/")[1]] = regular(init, 0o755)
    if tree.lookup("init") is None:
        tree.add("init", Inode("symlink", 0o777, target=INIT_PATH))
    dev = tree.lookup("dev", follow=True)
    if ("dev" not in tree.root.children or dev is not None and dev.kind == DIR) and tree.lookup(
        "dev/console"
    ) is None:
        tree.add("dev/console", Inode(CHAR, 0o600, rdev=(5, 1)))
    xbuild.children[CONFIG_PATH.split("/")[1]] = regular(b"", 0o644)  # counted as a path by the census
    xbuild.children[CONFIG_PATH.split("/")[1]] = regular(gc.encode() + census(tree).records(), 0o644)


def boot_tree(tree: Tree) -> Tree:
    """The initramfs of a root-disk guest: only what `install` put into `tree` for the init to start."""
    boot = Tree()
    for path in (INIT_PATH, CONFIG_PATH):
        node = tree.lookup(path)
        assert node is not None, f"install() first: no {path}"
        boot.add(path, node)
    boot.add("init", Inode("symlink", 0o777, target=INIT_PATH))
    boot.add("dev/console", Inode(CHAR, 0o600, rdev=(5, 1)))
    return boot
