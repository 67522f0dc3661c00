"""The guest init (initramfs/init.c) booted under QEMU TCG against fixture images built in the test.

Each image is written as an OCI layout (tests/fixtures/images.py), loaded and flattened by the real
pipeline, given the init by builder.guest.install and packed with builder.cpio. A small static test
program (PROBE_C, compiled with musl-gcc here) reports what it sees as hex-encoded lines.

The reference semantics - what `docker run IMAGE` gives the program - are written down per test from the
OCI image-spec's conversion rules and runc/docker's user resolution (see builder/guest.py's docstring):
  argv  = Entrypoint + Cmd; `docker run IMAGE ARGS` replaces Cmd only
  env   = PATH=<docker default> and HOSTNAME=<hostname>, overridden/extended by the image's Env, then
          HOME from the user's passwd entry ("/" without one) if Env has no HOME
  cwd   = WorkingDir ("/" when empty), created when missing
  ids   = User resolved in the image's /etc/passwd and /etc/group; groups = primary gid + the groups
          listing the user by name (only when no group is given)
The kernel is Debian's cloud kernel (`cloud_kernel`) until the trimmed one lands; XBUILD_TEST_KERNEL
points the boot tests at another one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.cache import atomic_dir, cache_dir
from builder.cpio import pack
from builder.flatten import flatten
from builder.guest import GuestConfig, guest_config, install
from builder.init import SOURCE, build_command, compiler, init_binary
from builder.reference import parse
from builder.run.console import RunResult
from builder.run.qemu import Qemu, run
from builder.source import load
from tests.fixtures import images as fx

HOSTNAME = "xbtest"
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/.xbuild/init\n"
PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\n"
    b"app:x:1000:1000:App:/home/app:/bin/sh\n"
    b"svc:x:2000:2001::/srv:/bin/false\n"
)
GROUP = b"root:x:0:\nwheel:x:10:root,app\nstaff:x:50:app\napp:x:1000:\nsvcgrp:x:2001:\n"

PROBE_C = r"""/* xbuild test program: reports what it sees (hex), exits, makes zombies, waits for signals. */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
static void hex(const char *tag, const char *s)
{
	printf("%s ", tag);
	for (; *s; s++)
		printf("%02x", (unsigned char)*s);
	printf("\n");
}
static int zombies(void)
{
	int n = 0;
	DIR *d = opendir("/proc");
	struct dirent *e;
	while (d && (e = readdir(d))) {
		char path[300], buf[512];
		if (e->d_name[0] < '0' || e->d_name[0] > '9')
			continue;
		snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(buf, sizeof buf, f)) {
			char *p = strrchr(buf, ')');
			if (p && p[1] == ' ' && p[2] == 'Z')
				n++;
		}
		fclose(f);
	}
	if (d)
		closedir(d);
	return n;
}
static void on_signal(int sig)
{
	char msg[64];
	int n = snprintf(msg, sizeof msg, "probe: got signal %d\n", sig);
	write(1, msg, n);
	_exit(3);
}
int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	const char *mode = argc > 1 ? argv[1] : "report";
	if (!strcmp(mode, "report")) {
		char cwd[4096];
		printf("probe: report\n");
		for (int i = 0; i < argc; i++)
			hex("ARG", argv[i]);
		for (char **e = environ; *e; e++)
			hex("ENV", *e);
		hex("CWD", getcwd(cwd, sizeof cwd) ? cwd : "?");
		gid_t g[256];
		int n = getgroups(256, g);
		printf("IDS %u %u %u %u\nGROUPS", getuid(), geteuid(), getgid(), getegid());
		for (int i = 0; i < n; i++)
			printf(" %u", g[i]);
		printf("\nPID %d\n", getpid());
		return 0;
	}
	if (!strcmp(mode, "etc")) {
		const char *files[] = { "/etc/hosts", "/etc/resolv.conf", "/proc/mounts",
					"/proc/sys/kernel/poweroff_cmd" };
		for (int i = 0; i < 4; i++) {
			char buf[8192] = "";
			FILE *f = fopen(files[i], "r");
			size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
			buf[n] = 0;
			if (f)
				fclose(f);
			printf("FILE %s ", files[i]);
			hex("", buf);
		}
		char h[256] = "";
		gethostname(h, sizeof h);
		hex("HOST", h);
		return 0;
	}
	if (!strcmp(mode, "exit"))
		return argc > 2 ? atoi(argv[2]) : 0;
	if (!strcmp(mode, "zombies")) {
		int count = argc > 2 ? atoi(argv[2]) : 100;
		pid_t mid = fork();
		if (mid == 0) {
			for (int i = 0; i < count; i++)
				if (fork() == 0)
					_exit(0);
			sleep(1); /* let them all die: zombies of `mid`, reparented to PID 1 when it exits */
			printf("probe: zombies before orphaning %d\n", zombies());
			_exit(0);
		}
		waitpid(mid, NULL, 0);
		for (int i = 0; i < 30 && zombies(); i++)
			usleep(100000);
		printf("probe: zombies left %d\n", zombies());
		return 0;
	}
	if (!strcmp(mode, "wait-signal")) {
		for (int s = 1; s < 32; s++)
			if (s != SIGKILL && s != SIGSTOP && s != SIGCHLD)
				signal(s, on_signal);
		printf("probe: ready\n");
		for (;;)
			pause();
	}
	if (!strcmp(mode, "ignore-signals")) {
		for (int s = 1; s < 32; s++)
			signal(s, SIG_IGN);
		printf("probe: ready\n");
		for (;;)
			pause();
	}
	printf("probe: unknown mode %s\n", mode);
	return 99;
}
"""


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def cloud_kernel() -> Path:
    """Debian's linux-image-*-cloud-amd64 vmlinuz, apt-get download + dpkg-deb -x into the cache."""
    override = os.environ.get("XBUILD_TEST_KERNEL")
    if override:
        return Path(override)
    d = cache_dir("test-kernel")
    found = sorted(d.glob("*/boot/vmlinuz-*-cloud-amd64"))
    if found:
        return found[-1]
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        pytest.skip("needs apt-get and dpkg-deb to fetch Debian's cloud kernel")
    deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True)
    names = [w.split()[-1] for w in deps.stdout.splitlines() if "Depends: linux-image-" in w]
    if not names:
        pytest.skip("apt knows no linux-image-cloud-amd64 (apt-get update?)")
    with atomic_dir(d / names[0]) as tmp:
        subprocess.run(["apt-get", "download", names[0]], cwd=tmp, check=True, capture_output=True)
        deb = next(tmp.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        (tmp / "boot").mkdir()
        for k in (tmp / "x" / "boot").glob("vmlinuz-*"):
            k.rename(tmp / "boot" / k.name)
        shutil.rmtree(tmp / "x")
        deb.unlink()
    return sorted(d.glob("*/boot/vmlinuz-*-cloud-amd64"))[-1]


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return fx.static_binary(PROBE_C, "probe", tmp_path_factory)


def probe_members(probe: bytes, extra: list[fx.Member] | None = None) -> list[fx.Member]:
    return [
        fx.dir("bin/"),
        fx.file("bin/probe", probe, mode=0o755),
        fx.dir("etc/"),
        fx.file("etc/passwd", PASSWD),
        fx.file("etc/group", GROUP),
        fx.dir("tmp/", mode=0o1777),
        *(extra or []),
    ]


def make_artifact(
    tmp: Path, kernel: Path, config: dict, members: list[fx.Member], hostname: str = HOSTNAME
) -> tuple[Path, GuestConfig]:
    """OCI layout → load → flatten → guest config + init → initrd; an artifact dir for the runner."""
    fx.write_oci_image(tmp / "layout", "t", [members], config)
    return artifact_from(tmp, kernel, f"oci:{tmp / 'layout'}:t", hostname)


def artifact_from(tmp: Path, kernel: Path, ref: str, hostname: str = HOSTNAME) -> tuple[Path, GuestConfig]:
    """An image reference → load → flatten → guest config + init → initrd; an artifact dir for the runner."""
    image = load(parse(ref))
    tree = flatten(image).tree
    gc = guest_config(image.config, tree, hostname)
    install(tree, gc, init_binary())
    art = tmp / "artifact"
    art.mkdir()
    pack(tree, art / "initrd.img", "lz4")
    (art / "kernel").symlink_to(kernel)
    (art / "cmdline").write_text(CMDLINE)
    return art, gc


def boot(art: Path, timeout: float = 120, **kw) -> RunResult:
    t0 = time.monotonic()
    r = run(art, timeout=timeout, accel="tcg", console=None, **kw)
    sys.stderr.write(f"boot: {time.monotonic() - t0:.1f}s wall, exec marker at {r.boot_us}us\n")
    (art / "console.log").write_bytes(r.console)  # kept in pytest's tmp dir for post-mortems
    return r


def report(r: RunResult) -> dict:
    """Parse the probe's report lines."""
    out: dict = {"argv": [], "env": {}, "env_list": []}
    for raw in r.console.decode(errors="replace").splitlines():
        line = raw.strip()
        tag, _, rest = line.partition(" ")
        if tag in ("ARG", "ENV", "CWD", "HOST"):
            val = bytes.fromhex(rest.strip()).decode()
            if tag == "ARG":
                out["argv"].append(val)
            elif tag == "ENV":
                k, _, v = val.partition("=")
                out["env"][k] = v
                out["env_list"].append(val)
            else:
                out[tag.lower()] = val
        elif tag == "FILE":
            path, _, hx = rest.partition(" ")
            out[path] = bytes.fromhex(hx.strip()).decode()
        elif tag == "IDS":
            out["uid"], out["euid"], out["gid"], out["egid"] = map(int, rest.split())
        elif tag == "GROUPS":
            out["groups"] = sorted(int(g) for g in rest.split())
    return out


slow = pytest.mark.slow


# ------------------------------------------------------------------------------------------- fast


def test_init_builds_small_static_and_cached(xbuild_cache: Path) -> None:
    data = init_binary()
    assert data[:4] == b"\x7fELF"
    assert len(data) < 200_000 if "musl" in compiler() else len(data) < 1_500_000
    entries = list((xbuild_cache / "init").iterdir())
    assert len(entries) == 1 and (entries[0] / "init").read_bytes() == data
    t0 = time.monotonic()
    assert init_binary() == data
    assert time.monotonic() - t0 < 0.5
    assert str(SOURCE) in build_command(compiler(), SOURCE, Path("/x"))


def test_init_no_compiler(xbuild_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.errors import PackError

    monkeypatch.setenv("XBUILD_INIT_CC", "no-such-compiler-xyz")
    with pytest.raises(PackError, match="no C compiler"):
        init_binary()


def test_init_is_reproducible(tmp_path: Path) -> None:
    cc = compiler()
    for name in ("a", "b"):
        subprocess.run(build_command(cc, SOURCE, tmp_path / name), check=True)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


# ------------------------------------------------------------------------------------------- boots

USER_CASES = {
    # User value: (uid, gid, supplementary groups, HOME)
    "": (0, 0, [0, 10], "/root"),  # root's entry; root is listed in wheel
    "app": (1000, 1000, [10, 50, 1000], "/home/app"),
    "1000": (1000, 1000, [10, 50, 1000], "/home/app"),  # numeric: the uid's entry, its groups
    "app:staff": (1000, 50, [50], "/home/app"),  # explicit group: no membership groups
    "1000:2001": (1000, 2001, [2001], "/home/app"),
    "4242": (4242, 0, [0], "/"),  # no passwd entry: gid 0, HOME /
    "4242:77": (4242, 77, [77], "/"),
    "svc": (2000, 2001, [2001], "/srv"),
}


@slow
@pytest.mark.parametrize("user", ["", "app", "app:staff", "4242:77"])
def test_program_sees_what_docker_run_gives(
    tmp_path: Path, cloud_kernel: Path, probe_binary: bytes, user: str
) -> None:
    config = {
        "Entrypoint": ["probe", "report"],
        "Cmd": ["a b", "", "c"],
        "Env": ["FOO=bar", "PATH=/usr/local/bin:/bin", "EMPTY="],
        "WorkingDir": "/work/dir",
        "User": user,
    }
    art, _ = make_artifact(tmp_path, cloud_kernel, config, probe_members(probe_binary))
    r = boot(art)
    assert r.exit_status == 0, r.console.decode(errors="replace")
    seen = report(r)
    uid, gid, groups, home = USER_CASES[user]
    # argv[0] as written (PATH lookup finds /bin/probe), Entrypoint then Cmd
    assert seen["argv"] == ["probe", "report", "a b", "", "c"]
    # docker's env: PATH (the image's replaces the default), HOSTNAME, the image's Env, HOME from passwd
    assert seen["env"] == {
        "PATH": "/usr/local/bin:/bin",
        "HOSTNAME": HOSTNAME,
        "FOO": "bar",
        "EMPTY": "",
        "HOME": home,
    }
    assert seen["cwd"] == "/work/dir"  # created: it is not in the image
    assert (seen["uid"], seen["euid"], seen["gid"], seen["egid"]) == (uid, uid, gid, gid)
    assert seen["groups"] == groups
    assert r.boot_us and r.boot_us > 0
    assert b"xbuild: exec /bin/probe at " in r.console


@slow
def test_defaults_without_env_workdir_user(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    """No Env/WorkingDir/User: docker's PATH, cwd /, root; an absolute Cmd without Entrypoint."""
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Cmd": ["/bin/probe", "report"]}, probe_members(probe_binary)
    )
    seen = report(boot(art))
    assert seen["argv"] == ["/bin/probe", "report"]
    assert seen["env_list"] == [f"PATH={DOCKER_PATH}", f"HOSTNAME={HOSTNAME}", "HOME=/root"]
    assert seen["cwd"] == "/"
    assert (seen["uid"], seen["gid"], seen["groups"]) == (0, 0, [0, 10])


@slow
def test_command_line_overrides(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    config = {"Entrypoint": ["probe"], "Cmd": ["exit", "9"], "Env": ["FOO=bar", "KEEP=1", "DROP=x"]}
    art, _ = make_artifact(tmp_path, cloud_kernel, config, probe_members(probe_binary))
    r = boot(
        art,
        kernel_args=[
            "xbuild.env=FOO=baz qux",
            "xbuild.env=NEW=1=2",
            "xbuild.env=DROP",
            "JUNK=kernel",
            "xbuild.hostname=other",
        ],
        extra_args=["report", "x y", "z"],
    )
    assert r.exit_status == 0, r.console.decode(errors="replace")
    seen = report(r)
    assert seen["argv"] == ["probe", "report", "x y", "z"]  # Cmd replaced, Entrypoint kept
    env = seen["env"]
    assert env["FOO"] == "baz qux" and env["NEW"] == "1=2" and env["KEEP"] == "1"
    assert "DROP" not in env and "JUNK" not in env  # kernel's own KEY=VALUE words filtered
    assert env["HOSTNAME"] == HOSTNAME  # the config's env, not recomputed


@slow
def test_etc_files_mounts_and_hostname(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["/bin/probe", "etc"]}, probe_members(probe_binary)
    )
    r = boot(art)
    seen = report(r)
    assert seen["host"] == HOSTNAME
    assert "127.0.0.1\tlocalhost" in seen["/etc/hosts"] and HOSTNAME in seen["/etc/hosts"]
    mounts = {line.split()[1]: line.split()[2] for line in seen["/proc/mounts"].splitlines()}
    for where, fs in {
        "/proc": "proc",
        "/sys": "sysfs",
        "/dev": "devtmpfs",
        "/dev/pts": "devpts",
        "/dev/shm": "tmpfs",
        "/run": "tmpfs",
    }.items():
        assert mounts.get(where) == fs, (where, mounts)
    assert "/tmp" not in mounts or mounts["/tmp"] == "tmpfs"
    assert seen["/proc/sys/kernel/poweroff_cmd"].strip() == "/.xbuild/init --poweroff"
    # nothing but the init-start and exec markers and the status line from init without xbuild.debug
    init_lines = [ln for ln in r.console.decode().splitlines() if ln.startswith("xbuild:")]
    assert len(init_lines) == 3 and init_lines[2] == "xbuild: exit status 0", init_lines
    assert init_lines[0].startswith("xbuild: init at ") and init_lines[1].startswith("xbuild: exec ")


@slow
def test_exit_status_7(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "exit", "7"]}, probe_members(probe_binary)
    )
    r = boot(art)
    assert r.exit_status == 7 and r.signal is None and r.error is None, r.console.decode(errors="replace")
    assert b"xbuild: exit status 7" in r.console


@slow
def test_orphaned_zombies_are_reaped(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "zombies", "100"]}, probe_members(probe_binary)
    )
    r = boot(art)
    text = r.console.decode()
    assert "probe: zombies before orphaning 100" in text  # 100 zombies really were made
    assert "probe: zombies left 0" in text, text
    assert r.exit_status == 0


@slow
@pytest.mark.parametrize("stop_signal,expected", [(None, 15), ("SIGUSR1", 10), ("QUIT", 3)])
def test_stop_from_host_reaches_program(
    tmp_path: Path, cloud_kernel: Path, probe_binary: bytes, stop_signal: str | None, expected: int
) -> None:
    config: dict = {"Entrypoint": ["probe", "wait-signal"]}
    if stop_signal:
        config["StopSignal"] = stop_signal
    art, _ = make_artifact(tmp_path, cloud_kernel, config, probe_members(probe_binary))
    guest = Qemu(art, accel="tcg")
    with guest:
        deadline = time.monotonic() + 120
        while guest.pump(0.2) and time.monotonic() < deadline:
            if b"probe: ready" in guest.watcher.buf:
                break
        guest.stop()
        r = guest.wait(timeout=60)
    got = [ln.strip() for ln in r.console.decode().splitlines() if "probe: got signal" in ln]
    assert got == [f"probe: got signal {expected}"], r.console.decode()
    assert r.exit_status == 3
    assert guest.proc is not None and guest.proc.poll() is not None


@slow
def test_grace_period_then_kill(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    """A program that ignores its StopSignal is killed after xbuild.grace seconds; the runner's timeout."""
    art, _ = make_artifact(
        tmp_path, cloud_kernel, {"Entrypoint": ["probe", "ignore-signals"]}, probe_members(probe_binary)
    )
    t0 = time.monotonic()
    # the timeout counts from launch: leave a loaded machine's TCG boot (over 20 s seen at load 14) time to
    # reach exec
    r = boot(art, timeout=45, kernel_args=["xbuild.grace=1"])
    assert r.signal == 9 and r.exit_status == 137, r.console.decode(errors="replace")
    assert b"xbuild: killed by signal 9 (SIGKILL)" in r.console
    assert r.error and "timed out" in r.error
    assert time.monotonic() - t0 < 90


@slow
@pytest.mark.parametrize(
    "config,status,message",
    [
        ({"Entrypoint": ["/docker-entrypoint.sh"]}, 127, "/docker-entrypoint.sh: No such file or directory"),
        ({"Cmd": ["nope", "x"]}, 127, "nope: executable file not found in $PATH"),
        ({"Cmd": ["/etc/passwd"]}, 126, "/etc/passwd: Permission denied"),
        ({"Cmd": ["probe"], "WorkingDir": "/etc/passwd"}, 125, "working directory /etc/passwd"),
    ],
)
def test_failure_before_exec_is_one_clear_line(
    tmp_path: Path, cloud_kernel: Path, probe_binary: bytes, config: dict, status: int, message: str
) -> None:
    art, _ = make_artifact(tmp_path, cloud_kernel, config, probe_members(probe_binary))
    r = boot(art)
    assert r.exit_status == status, r.console.decode(errors="replace")
    assert r.error is not None and message in r.error, r.error
    errors = [ln for ln in r.console.decode().splitlines() if ln.startswith("xbuild: error:")]
    assert len(errors) == 1
    assert b"Kernel panic" not in r.console


@slow
def test_image_with_its_own_init_keeps_it(tmp_path: Path, cloud_kernel: Path, probe_binary: bytes) -> None:
    """s6-overlay style: /init is the image's entrypoint; ours lives at /.xbuild/init (rdinit=)."""
    members = probe_members(probe_binary, [fx.symlink("init", "bin/probe")])
    art, _ = make_artifact(tmp_path, cloud_kernel, {"Entrypoint": ["/init", "exit", "5"]}, members)
    r = boot(art)
    assert r.exit_status == 5
    assert b"xbuild: exec /init at" in r.console


@slow
def test_busybox_image(tmp_path: Path, cloud_kernel: Path) -> None:
    """The shared busybox fixture: a shell script via Cmd override, PATH lookup through applet links."""
    img = fx.make_busybox_image(tmp_path / "layout", "bb", {"User": "nobody", "WorkingDir": "/home/nobody"})
    art, gc = artifact_from(tmp_path, cloud_kernel, img.ref, "bb")
    assert (gc.uid, gc.gid) == (65534, 65534)
    r = boot(art, extra_args=["sh", "-c", "echo id=$(id -u):$(id -g) pwd=$(pwd) home=$HOME; exit 4"])
    assert b"id=65534:65534 pwd=/home/nobody home=/home/nobody" in r.console, r.console.decode()
    assert r.exit_status == 4


@slow
def test_poweroff_helper_stops_the_program(tmp_path: Path, cloud_kernel: Path) -> None:
    """`xl shutdown` → orderly_poweroff → poweroff_cmd = `/.xbuild/init --poweroff` → SIGPWR to init →
    StopSignal to the program. Here the program runs the helper itself (no Xen under QEMU)."""
    img = fx.make_busybox_image(
        tmp_path / "layout", "bb", {"Cmd": ["sh", "-c", "/.xbuild/init --poweroff; sleep 30"]}
    )
    art, _ = artifact_from(tmp_path, cloud_kernel, img.ref, "bb")
    t0 = time.monotonic()
    r = boot(art)
    assert r.signal == 15 and b"xbuild: killed by signal 15 (SIGTERM)" in r.console, r.console.decode()
    assert time.monotonic() - t0 < 25  # not the 30 s sleep


@slow
def test_signals_to_pid1_are_forwarded(tmp_path: Path, cloud_kernel: Path) -> None:
    """SIGHUP/SIGTERM sent to init reach the program unchanged (not a shutdown)."""
    script = (
        "trap 'echo got-hup' HUP; trap 'echo got-term; exit 6' TERM; kill -HUP 1; sleep 1; "
        "kill -TERM 1; while :; do sleep 1; done"
    )
    img = fx.make_busybox_image(tmp_path / "layout", "bb", {"Cmd": ["sh", "-c", script]})
    art, _ = artifact_from(tmp_path, cloud_kernel, img.ref, "bb")
    r = boot(art, timeout=60)
    assert b"got-hup" in r.console and b"got-term" in r.console, r.console.decode()
    assert r.exit_status == 6


def test_init_key_covers_source_compiler_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The init's cache key changes with init.c's bytes, the compiler (its name and `--version`) and
    the flags; the same three give the same key."""
    from builder import init

    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc 1.0'\n")
    cc.chmod(0o755)
    key = init.cache_key(b"int main(){}", str(cc))
    assert key == init.cache_key(b"int main(){}", str(cc))
    assert key != init.cache_key(b"int main(){return 1;}", str(cc))
    cc.write_text("#!/bin/sh\necho 'cc 1.1'\n")
    assert key != init.cache_key(b"int main(){}", str(cc))
    cc.write_text("#!/bin/sh\necho 'cc 1.0'\n")
    monkeypatch.setattr(init, "FLAGS", (*init.FLAGS, "-O3"))
    assert key != init.cache_key(b"int main(){}", str(cc))
    monkeypatch.undo()
    assert key == init.cache_key(b"int main(){}", str(cc))
    assert key != init.cache_key(b"int main(){}", str(cc), "arm64")  # the same compiler named for arm64


def test_arm64_init_cross_compiled_static(xbuild_cache: Path) -> None:
    """init_binary("arm64"): a static aarch64 executable from the arm64 compiler (musl-dev:arm64's
    aarch64-linux-musl-gcc here: under 200 KB), cached under a key of its own."""
    from builder import init
    from builder.elf import parse

    data = init_binary("arm64")
    info = parse(data)
    assert (info.machine, info.etype, info.static) == ("EM_AARCH64", "ET_EXEC", True)
    assert Path(compiler("arm64")).name == "aarch64-linux-musl-gcc" and len(data) < 200_000
    assert init.key("arm64") != init.key() and init.cached(init.key("arm64")) == data
    assert parse(init_binary()).machine == "EM_X86_64"
    assert sorted(e.name for e in (xbuild_cache / "init").iterdir()) == sorted(
        [init.key(), init.key("arm64")]
    )


@pytest.mark.parametrize(
    ("arch", "variable", "cc", "machine"),
    [
        ("arm64", "XBUILD_INIT_CC_ARM64", "aarch64-linux-gnu-gcc", "EM_AARCH64"),
        ("amd64", "XBUILD_INIT_CC", "gcc", "EM_X86_64"),
    ],
)
def test_init_glibc_static_fallback(
    xbuild_cache: Path, monkeypatch: pytest.MonkeyPatch, arch: str, variable: str, cc: str, machine: str
) -> None:
    """Without musl, `gcc -static` (glibc) builds a working static init for each architecture (init.c's
    names do not clash with glibc's declarations)."""
    from builder.elf import parse

    monkeypatch.setenv(variable, cc)
    info = parse(init_binary(arch))
    assert (info.machine, info.static) == (machine, True)


def test_init_of_the_wrong_machine_refused(xbuild_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that builds for another machine than the architecture's (musl-gcc named for arm64) gives
    no init: PackError, nothing cached."""
    from builder.errors import PackError

    monkeypatch.setenv("XBUILD_INIT_CC_ARM64", "musl-gcc")
    with pytest.raises(PackError, match="is not a static EM_AARCH64 executable .EM_X86_64"):
        init_binary("arm64")
    assert not any((xbuild_cache / "init").glob("*/init"))
