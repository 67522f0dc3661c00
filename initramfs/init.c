/*
 * xbuild init: PID 1 of an xbuild guest. It sets up what `docker run` would give the image's entrypoint,
 * runs it, stays its reaper and signal forwarder, reports how it ended and powers the guest off.
 *
 * Build (builder/init.py does this, cached):  musl-gcc -static -Os -s ... -o init init.c
 *                                  (fallback)  gcc -static -Os -s ... -o init init.c
 * No kernel headers are needed (musl-gcc has none): the few evdev constants are defined below.
 *
 * ---- Guest config (/.xbuild/config, written by builder/guest.py) ----
 * A flat list of records, each `KEY NUL VALUE NUL`, in this order of meaning (keys may repeat):
 *   xbuild-guest-config 1      magic + format version; must be the first record
 *   arg       <string>         argv, one record per word, in order (Entrypoint + Cmd)
 *   cmd       <n>              index in argv where Cmd starts (= number of Entrypoint words)
 *   env       KEY=VALUE        the program's environment, one record per variable, in order
 *   cwd       <abs path>       working directory (created 0755 if missing, as runc does)
 *   uid, gid  <n>              numeric ids, resolved at build time
 *   group     <n>              one supplementary group per record (setgroups list, in order)
 *   stopsig   <n>              the image's StopSignal as a number
 *   hostname  <string>
 *   grace     <seconds>        default stop grace period (10 if absent)
 *   root      <device>         a root disk candidate (`--format disk`), one per record, tried in order
 *   rootmode  ro|rw            mount the root disk read-only or read-write (rw if absent)
 *   rootwait  <seconds>        how long to wait for a root disk to appear (10 if absent)
 *   health    <string>         the health probe's argv, one record per word (CMD-SHELL: behind its shell)
 *   healthinterval, healthtimeout, healthstart, healthstartint <ms>
 *                              Docker's Interval, Timeout, StartPeriod, StartInterval (defaults filled in)
 *   healthretries <n>          consecutive failures that make the program unhealthy
 *   files, pages <n>           the initramfs's census: its paths (the root and /.xbuild's included), and
 *                              the pages its files and long symlinks fill (this config's own excluded)
 * Unknown keys are ignored, so newer builders can add records.
 *
 * ---- A complete tree ----
 * The builder writes this config as the initramfs's last entry, and the kernel stops unpacking at its
 * first error ("Initramfs unpacking failed: ..."), so a config that is present proves every entry before
 * it was reached. But the kernel skips an entry it cannot create without an error (out of memory while
 * creating a file, a directory, a symlink), so init also compares the root tmpfs's own accounting (one
 * statfs: tmpfs charges an inode per path, hardlinks included, and a page per page of data) with the
 * census and refuses to run the program on less: `xbuild: error: initramfs incomplete: ...`, exit status
 * 125. The kernel's built-in /dev, /dev/console and /root may add up to 3 paths; a root that is not a
 * tmpfs (ramfs: no accounting) is not checked. A walk of the tree would do the same at ~19 us a path
 * under TCG and far more as a Xen PV guest of the nested rig (2.4 s for 790 paths).
 *
 * ---- Root disk (`--format disk`) ----
 * With `root` records the initramfs holds only this init and its config: init waits for the first
 * candidate that exists as a block device (/dev/vda under QEMU virtio, /dev/xvda under Xen blkfront),
 * mounts it as ext4 on /.xbuild/root, moves /dev and /proc there, deletes its own files from the
 * initramfs, makes the disk the root (MS_MOVE + chroot, as switch_root does) and goes on as below.
 *
 * ---- Kernel command line (read from /proc/cmdline; double quotes group words and are removed) ----
 *   xbuild.debug               say what init does (otherwise init prints only the lines below)
 *   xbuild.env=KEY=VALUE       add or replace a variable of the program's env; xbuild.env=KEY removes it
 *   xbuild.grace=S             stop grace period in seconds
 *   xbuild.hostname=NAME       override the hostname
 *   xbuild.health.interval=S, .timeout=S, .start_period=S, .start_interval=S, .retries=N
 *                              override the health probe's timing (seconds), as docker run's --health-*
 *   -- WORD...                 replace Cmd (Entrypoint is kept), like `docker run IMAGE WORD...`
 * Plain KEY=VALUE words that the kernel hands to init as environment are ignored: the program's env is
 * the config's (plus xbuild.env).
 *
 * ---- Console lines (parsed by builder/run/console.py) ----
 *   xbuild: init at <N>us                   first thing init does; N = CLOCK_BOOTTIME in microseconds
 *   xbuild: exec <path> at <N>us            just before execve; N = CLOCK_BOOTTIME in microseconds
 *   xbuild: exit status <N>                 the program exited with N
 *   xbuild: killed by signal <N> (<NAME>)   the program died of signal N
 *   xbuild: error: <message>                a failure before exec; followed by `exit status` 125 (setup),
 *                                           126 (cannot execute) or 127 (not found), as docker run uses
 *   xbuild: health: healthy|unhealthy       the health state changed (only with a `health` probe)
 *   xbuild: health: probe ...               on becoming unhealthy: how the last probe ended and its output
 *
 * ---- Health probe (the image's HEALTHCHECK, as moby's daemon/health.go runs it) ----
 * The state starts as "starting". The first probe runs one interval after the program started; each next
 * one an interval after the previous ended (StartInterval instead while still starting inside the start
 * period). A probe runs like `docker exec`: the program's user, groups, working directory and
 * environment, stdin /dev/null, its own session; stdout and stderr go to a pipe (the first 4096 bytes
 * are kept, as Docker keeps them). It is SIGKILLed (its whole process group) past Timeout, which counts
 * as a failure. Exit 0 makes the state healthy and resets the failure streak; any other end is a
 * failure, not counted while the state is still starting and the probe began inside StartPeriod;
 * `retries` consecutive counted failures make it unhealthy. No probe starts once a stop was requested.
 *
 * ---- Shutdown ----
 * The program exiting ends the guest: every other process is killed, the status line printed, the
 * console drained, file systems synced, the guest powered off. A stop from outside - SIGPWR (sent by
 * `init --poweroff`, which init installs as /proc/sys/kernel/poweroff_cmd: Xen's `xl shutdown` runs it
 * through orderly_poweroff), SIGINT (ctrl-alt-del, after reboot(RB_DISABLE_CAD)) or KEY_POWER on an
 * evdev device (QEMU system_powerdown: ACPI's Power Button on x86, gpio-keys on arm64 virt) - sends the
 * StopSignal to the program, waits the grace period, then SIGKILLs everything. SIGTERM, SIGHUP and the
 * StopSignal received by init are forwarded to the program as they are.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <grp.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define CONFIG_PATH "/.xbuild/config"
#define INIT_PATH "/.xbuild/init"
#define NEWROOT "/.xbuild/root"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define EXIT_SETUP 125
#define EXIT_NOEXEC 126
#define EXIT_NOTFOUND 127

/* evdev, without <linux/input.h> */
#define EVIOCGBIT(ev, len) ((2u << 30) | ((unsigned)(len) << 16) | ('E' << 8) | (0x20 + (ev)))
#define EV_KEY 1
#define KEY_POWER 116
struct evdev_event { long sec, usec; unsigned short type, code; int value; };

static int debug;

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n >= (int)sizeof buf) {
		n = sizeof buf - 1;
		buf[n - 1] = '\n';
	}
	for (int off = 0; off < n;) {
		ssize_t w = write(2, buf + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		off += w;
	}
}

#define DBG(...) do { if (debug) out("xbuild: debug: " __VA_ARGS__); } while (0)

/* ------------------------------------------------------------------------------------------ utils */

static char *read_file(const char *path, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap + 1);
	for (;;) {
		if (!buf) {
			close(fd);
			return NULL;
		}
		ssize_t r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			free(buf);
			close(fd);
			return NULL;
		}
		if (r == 0)
			break;
		n += r;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 1);
		}
	}
	close(fd);
	buf[n] = 0;
	if (len)
		*len = n;
	return buf;
}

static int write_file(const char *path, const char *data, int flags, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC | flags, mode);
	if (fd < 0)
		return -1;
	size_t n = strlen(data);
	ssize_t w = write(fd, data, n);
	close(fd);
	return w == (ssize_t)n ? 0 : -1;
}

static int mkdir_p(const char *path, mode_t mode)
{
	char tmp[4096];
	if (strlen(path) >= sizeof tmp) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(tmp, path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(tmp, mode) < 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(tmp, mode) < 0 && errno != EEXIST)
		return -1;
	return 0;
}

static const char *signame(int sig)
{
	static const char *const names[] = {
		[SIGHUP] = "SIGHUP", [SIGINT] = "SIGINT", [SIGQUIT] = "SIGQUIT", [SIGILL] = "SIGILL",
		[SIGTRAP] = "SIGTRAP", [SIGABRT] = "SIGABRT", [SIGBUS] = "SIGBUS", [SIGFPE] = "SIGFPE",
		[SIGKILL] = "SIGKILL", [SIGUSR1] = "SIGUSR1", [SIGSEGV] = "SIGSEGV", [SIGUSR2] = "SIGUSR2",
		[SIGPIPE] = "SIGPIPE", [SIGALRM] = "SIGALRM", [SIGTERM] = "SIGTERM", [SIGSTKFLT] = "SIGSTKFLT",
		[SIGCHLD] = "SIGCHLD", [SIGCONT] = "SIGCONT", [SIGSTOP] = "SIGSTOP", [SIGTSTP] = "SIGTSTP",
		[SIGTTIN] = "SIGTTIN", [SIGTTOU] = "SIGTTOU", [SIGURG] = "SIGURG", [SIGXCPU] = "SIGXCPU",
		[SIGXFSZ] = "SIGXFSZ", [SIGVTALRM] = "SIGVTALRM", [SIGPROF] = "SIGPROF", [SIGWINCH] = "SIGWINCH",
		[SIGIO] = "SIGIO", [SIGPWR] = "SIGPWR", [SIGSYS] = "SIGSYS",
	};
	static char buf[16];
	if (sig > 0 && sig < (int)(sizeof names / sizeof names[0]) && names[sig])
		return names[sig];
	if (sig >= 34 && sig < 64) {
		snprintf(buf, sizeof buf, "SIGRTMIN+%d", sig - 34);
		return buf;
	}
	if (sig == 64)
		return "SIGRTMAX";
	snprintf(buf, sizeof buf, "SIG%d", sig);
	return buf;
}

static unsigned long long boot_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------------------------- power off */

static void drain_console(void)
{
	tcdrain(1);
	tcdrain(2);
}

static void __attribute__((noreturn)) power_off(void)
{
	drain_console();
	sync();
	reboot(RB_POWER_OFF);
	/* no ACPI / no Xen: a reboot ends QEMU -no-reboot guests; halt as the last resort */
	reboot(RB_AUTOBOOT);
	reboot(RB_HALT_SYSTEM);
	for (;;)
		pause();
}

/* Prefix of a failure line: the program's are console markers, a health probe's are its output. */
static const char *fail_prefix = "xbuild: error: ";

/* The one `xbuild: error: ...` line of a failure before exec. */
static void error_line(const char *fmt, va_list ap)
{
	char msg[768];
	vsnprintf(msg, sizeof msg, fmt, ap);
	out("%s%s\n", fail_prefix, msg);
}

/* A failure in init itself (before the program runs): one error line, a status line, power off. */
static void __attribute__((noreturn)) die(int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	error_line(fmt, ap);
	va_end(ap);
	out("xbuild: exit status %d\n", status);
	power_off();
}

/* ---------------------------------------------------------------------------------------- mounts */

/* Mount `type` on `dir` unless the image has `dir` as something else than a directory, it is a mount
 * point already, or (`keep_content`) it is a directory with content the mount would hide. */
static void mount_fs(const char *dir, const char *type, unsigned long flags, const char *data, mode_t mode,
		     int keep_content)
{
	struct stat st, pst;
	if (lstat(dir, &st) < 0) {
		if (errno != ENOENT || mkdir(dir, mode) < 0) {
			DBG("%s: cannot create: %s\n", dir, strerror(errno));
			return;
		}
	} else if (!S_ISDIR(st.st_mode)) {
		DBG("%s: the image has it as a non-directory: not mounting %s\n", dir, type);
		return;
	} else {
		char parent[4096];
		snprintf(parent, sizeof parent, "%s/..", dir);
		if (stat(parent, &pst) == 0 && pst.st_dev != st.st_dev) {
			DBG("%s: already a mount point\n", dir);
			return;
		}
		if (keep_content) {
			DIR *d = opendir(dir);
			struct dirent *e;
			int empty = 1;
			while (d && (e = readdir(d)))
				if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
					empty = 0;
					break;
				}
			if (d)
				closedir(d);
			if (!empty) {
				DBG("%s: the image has content there: not mounting %s\n", dir, type);
				return;
			}
		}
	}
	if (mount(type, dir, type, flags, data) < 0)
		DBG("mount %s on %s: %s\n", type, dir, strerror(errno));
	else
		DBG("mounted %s on %s\n", type, dir);
}

/* What init needs first: /dev (the console, disks) and /proc (the command line). */
static void mount_dev_proc(void)
{
	mount_fs("/dev", "devtmpfs", MS_NOSUID, "mode=0755", 0755, 0);
	mount_fs("/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555, 0);
}

static void ensure_console(void)
{
	if (fcntl(1, F_GETFD) >= 0 && fcntl(2, F_GETFD) >= 0)
		return;
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		if (fcntl(i, F_GETFD) < 0)
			dup2(fd, i);
	if (fd > 2)
		close(fd);
}

static void setup_mounts(void)
{
	const unsigned long nse = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	mount_fs("/proc", "proc", nse, NULL, 0555, 0);
	mount_fs("/sys", "sysfs", nse, NULL, 0555, 0);
	mount_fs("/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666", 0755, 0);
	mount_fs("/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 01777, 0);
	mount_fs("/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 01777, 1);
	mount_fs("/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", 0755, 1);
	static const char *const links[][2] = {
		{"/proc/self/fd", "/dev/fd"}, {"/proc/self/fd/0", "/dev/stdin"},
		{"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"},
	};
	for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
		if (symlink(links[i][0], links[i][1]) < 0 && errno != EEXIST)
			DBG("symlink %s: %s\n", links[i][1], strerror(errno));
}

/* ------------------------------------------------------------------------------ config + cmdline */

struct strv { char **v; int n, cap; };

static void strv_push(struct strv *s, char *x)
{
	if (s->n + 2 > s->cap) {
		s->cap = s->cap ? 2 * s->cap : 16;
		s->v = realloc(s->v, s->cap * sizeof *s->v);
		if (!s->v)
			die(EXIT_SETUP, "out of memory");
	}
	s->v[s->n++] = x;
	s->v[s->n] = NULL;
}

static struct {
	struct strv argv, env;
	int cmd_index;
	char *cwd;
	uid_t uid;
	gid_t gid;
	gid_t groups[256];
	int ngroups;
	int stopsig;
	char *hostname;
	int grace;
	struct strv roots;
	int root_ro;
	int rootwait;
	struct strv health;
	long long h_interval, h_timeout, h_start, h_startint, h_retries; /* ms, ms, ms, ms, count */
	long long files, pages; /* the census; -1: none recorded */
} cfg = { .files = -1, .pages = -1, .cwd = "/", .stopsig = SIGTERM, .grace = 10, .rootwait = 10,
	  .h_interval = 30000, .h_timeout = 30000, .h_start = 0, .h_startint = 5000, .h_retries = 3 };

static size_t cfg_len; /* the config's size in bytes */

static long parse_num(const char *key, const char *v)
{
	char *end;
	errno = 0;
	long n = strtol(v, &end, 10);
	if (errno || !*v || *end || n < 0)
		die(EXIT_SETUP, "%s: bad number %s=%s", CONFIG_PATH, key, v);
	return n;
}

static void read_config(void)
{
	size_t len;
	char *buf = read_file(CONFIG_PATH, &len);
	cfg_len = len;
	if (!buf)
		die(EXIT_SETUP, "cannot read %s: %s%s", CONFIG_PATH, strerror(errno),
		    errno == ENOENT ? " (it is the initramfs's last entry: the kernel did not unpack all of it)" : "");
	int first = 1;
	for (size_t i = 0; i < len;) {
		char *key = buf + i;
		size_t kl = strnlen(key, len - i);
		if (i + kl >= len)
			die(EXIT_SETUP, "%s: truncated record", CONFIG_PATH);
		char *val = key + kl + 1;
		size_t vl = strnlen(val, len - (i + kl + 1));
		if (i + kl + 1 + vl >= len)
			die(EXIT_SETUP, "%s: truncated record", CONFIG_PATH);
		i += kl + vl + 2;
		if (first) {
			if (strcmp(key, "xbuild-guest-config") || strcmp(val, "1"))
				die(EXIT_SETUP, "%s: not an xbuild guest config (version 1)", CONFIG_PATH);
			first = 0;
		} else if (!strcmp(key, "arg")) {
			strv_push(&cfg.argv, val);
		} else if (!strcmp(key, "cmd")) {
			cfg.cmd_index = parse_num(key, val);
		} else if (!strcmp(key, "env")) {
			strv_push(&cfg.env, val);
		} else if (!strcmp(key, "cwd")) {
			cfg.cwd = val;
		} else if (!strcmp(key, "uid")) {
			cfg.uid = parse_num(key, val);
		} else if (!strcmp(key, "gid")) {
			cfg.gid = parse_num(key, val);
		} else if (!strcmp(key, "group")) {
			if (cfg.ngroups < (int)(sizeof cfg.groups / sizeof cfg.groups[0]))
				cfg.groups[cfg.ngroups++] = parse_num(key, val);
		} else if (!strcmp(key, "stopsig")) {
			cfg.stopsig = parse_num(key, val);
		} else if (!strcmp(key, "hostname")) {
			cfg.hostname = val;
		} else if (!strcmp(key, "grace")) {
			cfg.grace = parse_num(key, val);
		} else if (!strcmp(key, "root")) {
			strv_push(&cfg.roots, val);
		} else if (!strcmp(key, "rootmode")) {
			if (strcmp(val, "ro") && strcmp(val, "rw"))
				die(EXIT_SETUP, "%s: rootmode must be ro or rw, not %s", CONFIG_PATH, val);
			cfg.root_ro = !strcmp(val, "ro");
		} else if (!strcmp(key, "rootwait")) {
			cfg.rootwait = parse_num(key, val);
		} else if (!strcmp(key, "health")) {
			strv_push(&cfg.health, val);
		} else if (!strcmp(key, "healthinterval")) {
			cfg.h_interval = parse_num(key, val);
		} else if (!strcmp(key, "healthtimeout")) {
			cfg.h_timeout = parse_num(key, val);
		} else if (!strcmp(key, "healthstart")) {
			cfg.h_start = parse_num(key, val);
		} else if (!strcmp(key, "healthstartint")) {
			cfg.h_startint = parse_num(key, val);
		} else if (!strcmp(key, "healthretries")) {
			cfg.h_retries = parse_num(key, val);
		} else if (!strcmp(key, "files")) {
			cfg.files = parse_num(key, val);
		} else if (!strcmp(key, "pages")) {
			cfg.pages = parse_num(key, val);
		}
	}
	if (first)
		die(EXIT_SETUP, "%s: empty", CONFIG_PATH);
	if (cfg.stopsig <= 0 || cfg.stopsig > 64)
		cfg.stopsig = SIGTERM;
	if (cfg.cmd_index > cfg.argv.n)
		cfg.cmd_index = cfg.argv.n;
	if (cfg.h_retries <= 0)
		cfg.h_retries = 3;
}

/* Add, replace (KEY=VALUE) or remove (KEY) a variable. */
static void env_set(struct strv *env, char *kv)
{
	char *eq = strchr(kv, '=');
	size_t kl = eq ? (size_t)(eq - kv) : strlen(kv);
	for (int i = 0; i < env->n; i++) {
		if (strncmp(env->v[i], kv, kl) || env->v[i][kl] != '=')
			continue;
		if (eq) {
			env->v[i] = kv;
		} else {
			memmove(env->v + i, env->v + i + 1, (env->n - i) * sizeof *env->v);
			env->n--;
		}
		return;
	}
	if (eq && kl)
		strv_push(env, kv);
}

static const char *env_get(struct strv *env, const char *key)
{
	size_t kl = strlen(key);
	for (int i = 0; i < env->n; i++)
		if (!strncmp(env->v[i], key, kl) && env->v[i][kl] == '=')
			return env->v[i] + kl + 1;
	return NULL;
}

/* Split /proc/cmdline like the kernel does: whitespace separates words, double quotes group. */
static void read_cmdline(struct strv *words)
{
	char *buf = read_file("/proc/cmdline", NULL);
	if (!buf)
		return;
	char *p = buf;
	for (;;) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!*p)
			break;
		char *w = p, *o = p;
		int quoted = 0;
		for (; *p && (quoted || (*p != ' ' && *p != '\t' && *p != '\n')); p++) {
			if (*p == '"')
				quoted = !quoted;
			else
				*o++ = *p;
		}
		int end = !*p;
		if (!end)
			p++;
		*o = 0;
		strv_push(words, w);
		if (end)
			break;
	}
}

static void apply_cmdline(struct strv *words)
{
	int dashes = 0;
	struct strv cmd = {0};
	for (int i = 0; i < words->n; i++) {
		char *w = words->v[i];
		if (dashes) {
			strv_push(&cmd, w);
		} else if (!strcmp(w, "--")) {
			dashes = 1;
		} else if (!strcmp(w, "xbuild.debug")) {
			debug = 1;
		} else if (!strncmp(w, "xbuild.env=", 11)) {
			env_set(&cfg.env, w + 11);
		} else if (!strncmp(w, "xbuild.grace=", 13)) {
			char *end;
			long g = strtol(w + 13, &end, 10);
			if (!*end && g >= 0)
				cfg.grace = g;
		} else if (!strncmp(w, "xbuild.hostname=", 16)) {
			cfg.hostname = w + 16;
		} else if (!strncmp(w, "xbuild.health.", 14)) {
			static const struct { const char *name; long long *v; long long unit; } keys[] = {
				{ "interval=", &cfg.h_interval, 1000 }, { "timeout=", &cfg.h_timeout, 1000 },
				{ "start_period=", &cfg.h_start, 1000 }, { "start_interval=", &cfg.h_startint, 1000 },
				{ "retries=", &cfg.h_retries, 1 },
			};
			for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
				size_t kl = strlen(keys[k].name);
				if (strncmp(w + 14, keys[k].name, kl))
					continue;
				char *end;
				errno = 0;
				long long v = strtoll(w + 14 + kl, &end, 10);
				if (!errno && end != w + 14 + kl && !*end && v >= 0 && v <= 1000000000LL)
					*keys[k].v = v * keys[k].unit;
			}
		}
	}
	if (cmd.n) {
		struct strv argv = {0};
		for (int i = 0; i < cfg.cmd_index; i++)
			strv_push(&argv, cfg.argv.v[i]);
		for (int i = 0; i < cmd.n; i++)
			strv_push(&argv, cmd.v[i]);
		cfg.argv = argv;
	}
}

/* ------------------------------------------------------------------------------------ root disk */

/* The first root candidate that is a block device, waiting up to cfg.rootwait seconds for one. */
static const char *wait_root(void)
{
	long long end = now_ms() + cfg.rootwait * 1000LL;
	for (;;) {
		for (int i = 0; i < cfg.roots.n; i++) {
			struct stat st;
			if (stat(cfg.roots.v[i], &st) == 0 && S_ISBLK(st.st_mode))
				return cfg.roots.v[i];
		}
		if (now_ms() >= end)
			return NULL;
		usleep(5000);
	}
}

/* Move the mount on `dir` into the new root; detach it when that is impossible (no such directory). */
static void move_into_root(const char *dir)
{
	char target[256];
	snprintf(target, sizeof target, NEWROOT "%s", dir);
	if (mount(dir, target, NULL, MS_MOVE, NULL) < 0) {
		DBG("move %s: %s\n", dir, strerror(errno));
		umount2(dir, MNT_DETACH);
	}
}

/* Mount the root disk and make it `/`, freeing the initramfs (switch_root semantics). */
static void switch_to_disk(void)
{
	const char *dev = wait_root();
	if (!dev) {
		char names[512] = "";
		for (int i = 0, used = 0; i < cfg.roots.n && used < (int)sizeof names; i++)
			used += snprintf(names + used, sizeof names - used, "%s%s", i ? " or " : "", cfg.roots.v[i]);
		die(EXIT_SETUP, "root disk: no %s appeared within %ds (is the disk attached?)", names, cfg.rootwait);
	}
	if (mkdir(NEWROOT, 0755) < 0 && errno != EEXIST)
		die(EXIT_SETUP, "mkdir %s: %s", NEWROOT, strerror(errno));
	if (mount(dev, NEWROOT, "ext4", cfg.root_ro ? MS_RDONLY : 0, "") < 0)
		die(EXIT_SETUP, "root disk: cannot mount %s (ext4, %s): %s", dev, cfg.root_ro ? "ro" : "rw",
		    strerror(errno));
	DBG("mounted %s on / (%s) at %lluus\n", dev, cfg.root_ro ? "ro" : "rw", boot_us());
	move_into_root("/dev");
	move_into_root("/proc");
	/* what the initramfs held: this init (it keeps running from memory), its config, the links to it */
	static const char *const own[] = { "/init", "/dev/console", CONFIG_PATH, INIT_PATH };
	for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
		unlink(own[i]);
	if (chdir(NEWROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
		die(EXIT_SETUP, "root disk: cannot switch to %s: %s", dev, strerror(errno));
	mount_dev_proc(); /* where the moves failed */
}

/* ------------------------------------------------------------------------------ network + /etc */

static void setup_network(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		DBG("socket: %s\n", strerror(errno));
		return;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
		DBG("lo: %s\n", strerror(errno));
	} else {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			DBG("lo up: %s\n", strerror(errno));
	}

	if (cfg.hostname && *cfg.hostname && sethostname(cfg.hostname, strlen(cfg.hostname)) < 0)
		DBG("sethostname: %s\n", strerror(errno));

	struct stat st;
	mkdir("/etc", 0755);
	if (stat("/etc/hosts", &st) < 0) {
		/* the first configured non-loopback IPv4 address (from ip= autoconfiguration) */
		char addr[INET_ADDRSTRLEN] = "127.0.1.1";
		struct ifreq reqs[16];
		struct ifconf ifc = { .ifc_len = sizeof reqs, .ifc_req = reqs };
		if (ioctl(s, SIOCGIFCONF, &ifc) == 0) {
			for (int i = 0; i < ifc.ifc_len / (int)sizeof reqs[0]; i++) {
				struct sockaddr_in *sin = (struct sockaddr_in *)&reqs[i].ifr_addr;
				if (sin->sin_family == AF_INET && strcmp(reqs[i].ifr_name, "lo")) {
					inet_ntop(AF_INET, &sin->sin_addr, addr, sizeof addr);
					break;
				}
			}
		}
		char hosts[512];
		const char *h = cfg.hostname && *cfg.hostname ? cfg.hostname : "localhost";
		snprintf(hosts, sizeof hosts,
			 "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", addr, h);
		unlink("/etc/hosts"); /* a dangling symlink */
		if (write_file("/etc/hosts", hosts, O_CREAT | O_TRUNC, 0644) < 0)
			DBG("/etc/hosts: %s\n", strerror(errno));
	}
	close(s);

	if (stat("/etc/resolv.conf", &st) < 0) {
		/* ip= autoconfiguration leaves the name servers (static dns0/dns1 or DHCP's) here */
		char *pnp = read_file("/proc/net/pnp", NULL);
		if (pnp) {
			char resolv[1024] = "";
			size_t used = 0;
			for (char *line = strtok(pnp, "\n"); line; line = strtok(NULL, "\n")) {
				const char *fmt = NULL, *arg = NULL;
				if (!strncmp(line, "nameserver ", 11)) {
					fmt = "nameserver %s\n", arg = line + 11;
					if (!strcmp(arg, "0.0.0.0"))
						continue;
				} else if (!strncmp(line, "domain ", 7)) {
					fmt = "search %s\n", arg = line + 7;
				}
				if (fmt && used < sizeof resolv)
					used += snprintf(resolv + used, sizeof resolv - used, fmt, arg);
			}
			if (strstr(resolv, "nameserver")) {
				unlink("/etc/resolv.conf");
				if (write_file("/etc/resolv.conf", resolv, O_CREAT | O_TRUNC, 0644) < 0)
					DBG("/etc/resolv.conf: %s\n", strerror(errno));
			}
			free(pnp);
		}
	}
}

/* Every evdev device that can send KEY_POWER: ACPI's "Power Button" (x86: QEMU system_powerdown), the
 * gpio-keys of QEMU virt's PL061 (arm64). */
static int open_power_buttons(int *fds, int max)
{
	int n = 0;
	for (int i = 0; i < 32 && n < max; i++) {
		char path[32];
		unsigned char keys[KEY_POWER / 8 + 1] = {0};
		snprintf(path, sizeof path, "/dev/input/event%d", i);
		int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			continue;
		if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) >= 0
		    && (keys[KEY_POWER / 8] >> (KEY_POWER % 8)) & 1) {
			DBG("watching %s\n", path);
			fds[n++] = fd;
		} else {
			close(fd);
		}
	}
	return n;
}

/* ----------------------------------------------------------------------------------- the program */

/* Go's exec.LookPath, as runc uses it: a name without '/' is searched in PATH (empty entry = "."). */
static char *look_path(const char *name, const char *path)
{
	static char buf[4096];
	if (strchr(name, '/'))
		return (char *)name;
	const char *p = path;
	for (;;) {
		const char *colon = strchr(p, ':');
		size_t dl = colon ? (size_t)(colon - p) : strlen(p);
		if (dl == 0)
			snprintf(buf, sizeof buf, "./%s", name);
		else
			snprintf(buf, sizeof buf, "%.*s/%s", (int)dl, p, name);
		struct stat st;
		if (stat(buf, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111))
			return buf;
		if (!colon)
			return NULL;
		p = colon + 1;
	}
}

static void __attribute__((noreturn)) child_fail(int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	error_line(fmt, ap);
	va_end(ap);
	_exit(status);
}

/* In a child of init: become what `docker run` makes of the image (signals, session, umask, stdin,
 * working directory, user and groups), as the program and each health probe run. */
static void enter_container(void)
{
	sigset_t none;
	sigemptyset(&none);
	for (int s = 1; s < 65; s++)
		signal(s, SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setsid();
	umask(022);

	int null = open("/dev/null", O_RDWR);
	if (null >= 0 && null != 0) {
		dup2(null, 0);
		close(null);
	}

	const char *cwd = cfg.cwd && *cfg.cwd ? cfg.cwd : "/";
	if (mkdir_p(cwd, 0755) < 0)
		child_fail(EXIT_SETUP, "cannot create working directory %s: %s", cwd, strerror(errno));
	int cwd_ok = chdir(cwd) == 0;
	int cwd_err = errno;

	if (setgroups(cfg.ngroups, cfg.groups) < 0)
		child_fail(EXIT_SETUP, "setgroups: %s", strerror(errno));
	if (setgid(cfg.gid) < 0)
		child_fail(EXIT_SETUP, "setgid %u: %s", (unsigned)cfg.gid, strerror(errno));
	if (setuid(cfg.uid) < 0)
		child_fail(EXIT_SETUP, "setuid %u: %s", (unsigned)cfg.uid, strerror(errno));
	/* as runc: retry the chdir as the user (a directory only the user may enter) */
	if (!cwd_ok && chdir(cwd) < 0)
		child_fail(EXIT_SETUP, "cannot change to working directory %s: %s", cwd, strerror(cwd_err));
}

/* Exec `argv` with the program's environment, found on its PATH; `marker`: print the exec line first. */
static void __attribute__((noreturn)) exec_argv(struct strv *argv, int marker)
{
	if (argv->n == 0)
		child_fail(EXIT_SETUP, "no command: the image has neither Entrypoint nor Cmd");
	const char *path_env = env_get(&cfg.env, "PATH");
	const char *name = argv->v[0];
	char *prog = look_path(name, path_env ? path_env : DEFAULT_PATH);
	if (!prog)
		child_fail(EXIT_NOTFOUND, "%s: executable file not found in $PATH", name);

	if (marker)
		out("xbuild: exec %s at %lluus\n", prog, boot_us());
	execve(prog, argv->v, cfg.env.v);
	int e = errno;
	struct stat st;
	if (e == ENOENT && stat(prog, &st) == 0)
		child_fail(EXIT_NOTFOUND, "%s: no such file or directory (its interpreter or dynamic loader is missing)",
			   prog);
	child_fail(e == ENOENT ? EXIT_NOTFOUND : EXIT_NOEXEC, "%s: %s", prog, strerror(e));
}

/* ---------------------------------------------------------------------------------- health probe */

enum { H_STARTING = 1, H_HEALTHY, H_UNHEALTHY };
static const char *const hstate_name[] = { "none", "starting", "healthy", "unhealthy" };

static struct {
	int state;                  /* 0: no probe configured */
	long long started;          /* when the program started (ms, CLOCK_MONOTONIC) */
	long long next;             /* when the next probe starts (no probe running) */
	long long probe_start, deadline;
	long long streak;           /* consecutive counted failures */
	pid_t pid;                  /* the running probe, 0 if none */
	int fd, timed_out, truncated;
	size_t len;
	char out[4096];             /* Docker's maxOutputLen */
} hl = { .fd = -1 };

/* Time until the next probe (moby's getInterval; a probe is never scheduled past the start period's
 * end unless the state is still starting, when StartInterval applies). */
static long long health_interval(void)
{
	long long elapsed = now_ms() - hl.started;
	if (elapsed >= cfg.h_start)
		return cfg.h_interval;
	if (hl.state == H_STARTING)
		return cfg.h_startint;
	long long left = cfg.h_start - elapsed;
	return left < cfg.h_interval ? left : cfg.h_interval;
}

static void health_read(void)
{
	char buf[1024];
	for (;;) {
		ssize_t r = read(hl.fd, buf, sizeof buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r == 0 || errno != EAGAIN) {
				close(hl.fd);
				hl.fd = -1;
			}
			return;
		}
		size_t keep = sizeof hl.out - hl.len < (size_t)r ? sizeof hl.out - hl.len : (size_t)r;
		memcpy(hl.out + hl.len, buf, keep);
		hl.len += keep;
		if (keep < (size_t)r)
			hl.truncated = 1;
	}
}

static void health_start(void)
{
	int p[2];
	hl.len = 0;
	hl.truncated = hl.timed_out = 0;
	hl.probe_start = now_ms();
	hl.deadline = hl.probe_start + cfg.h_timeout;
	if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
		DBG("health: pipe: %s\n", strerror(errno));
		return;
	}
	pid_t pid = fork();
	if (pid == 0) {
		fail_prefix = "";
		int fl = fcntl(p[1], F_GETFL);
		fcntl(p[1], F_SETFL, fl & ~O_NONBLOCK);
		dup2(p[1], 1);
		dup2(p[1], 2);
		enter_container();
		exec_argv(&cfg.health, 0);
	}
	close(p[1]);
	if (pid < 0) {
		DBG("health: fork: %s\n", strerror(errno));
		close(p[0]);
		return;
	}
	hl.pid = pid;
	hl.fd = p[0];
	DBG("health: probe %d started\n", (int)pid);
}

/* A probe ended (`st` from waitpid; -1: it could not start): update the state as handleProbeResult. */
static void health_result(int st)
{
	if (hl.fd >= 0) {
		health_read();
		if (hl.fd >= 0) {   /* something the probe started still holds the pipe */
			close(hl.fd);
			hl.fd = -1;
		}
	}
	int ok = !hl.timed_out && st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
	int old = hl.state;
	if (ok) {
		hl.streak = 0;
		hl.state = H_HEALTHY;
	} else if (!(hl.state == H_STARTING && hl.probe_start - hl.started < cfg.h_start)) {
		if (++hl.streak >= cfg.h_retries)
			hl.state = H_UNHEALTHY;
	}
	DBG("health: probe ended (%s, streak %lld)\n", ok ? "ok" : "failed", hl.streak);
	if (hl.state != old) {
		out("xbuild: health: %s\n", hstate_name[hl.state]);
		if (hl.state == H_UNHEALTHY) {
			if (hl.timed_out)
				out("xbuild: health: probe timed out after %lldms\n", cfg.h_timeout);
			else if (st == -1)
				out("xbuild: health: probe could not start\n");
			else if (WIFSIGNALED(st))
				out("xbuild: health: probe killed by signal %d (%s)\n", WTERMSIG(st), signame(WTERMSIG(st)));
			else
				out("xbuild: health: probe exit status %d\n", WEXITSTATUS(st));
			for (size_t i = 0; i < hl.len;) {
				size_t e = i;
				while (e < hl.len && hl.out[e] != '\n')
					e++;
				out("xbuild: health: probe: %.*s%s\n", (int)(e - i), hl.out + i,
				    e >= hl.len && hl.truncated ? "..." : "");
				i = e + 1;
			}
		}
	}
	hl.pid = 0;
	hl.next = now_ms() + health_interval();
}

/* ----------------------------------------------------------------------------------------- main */

/* ------------------------------------------------------------------------------- tree census */

/* What the root tmpfs holds: paths (inodes charged) and pages; -1 where it keeps no account. */
static void root_census(long long *files, long long *pages)
{
	struct statfs sf;
	*files = *pages = -1;
	if (statfs("/", &sf) < 0)
		return;
	if (sf.f_files)
		*files = (long long)(sf.f_files - sf.f_ffree);
	if (sf.f_blocks)
		*pages = (long long)(sf.f_blocks - sf.f_bfree) * (long long)sf.f_bsize / 4096;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--poweroff")) {
		/* the kernel's poweroff_cmd helper (xl shutdown -> orderly_poweroff): ask PID 1 to stop */
		return kill(1, SIGPWR) < 0;
	}
	if (getpid() != 1) {
		out("xbuild: error: this is the guest's init; it must run as PID 1\n");
		return 2;
	}

	unsigned long long started = boot_us();
	sigset_t all;
	sigfillset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);

	long long files, pages;
	root_census(&files, &pages);
	mount_dev_proc();
	ensure_console();
	out("xbuild: init at %lluus\n", started);
	struct strv words = {0};
	read_cmdline(&words);
	for (int i = 0; i < words.n && strcmp(words.v[i], "--"); i++)
		if (!strcmp(words.v[i], "xbuild.debug"))
			debug = 1;
	read_config();
	long long want_pages = cfg.pages < 0 ? -1 : cfg.pages + (long long)((cfg_len + 4095) / 4096);
	DBG("census: %lld paths, %lld pages (packed: %lld, %lld)\n", files, pages, cfg.files, want_pages);
	if (!cfg.roots.n && ((files >= 0 && files < cfg.files) || (pages >= 0 && pages < want_pages)))
		die(EXIT_SETUP, "initramfs incomplete: %lld of %lld files, %lld of %lld pages unpacked "
		    "(too little guest memory? the kernel says why above)", files, cfg.files, pages, want_pages);
	if (cfg.roots.n)
		switch_to_disk();
	setup_mounts();
	apply_cmdline(&words);

	if (reboot(RB_DISABLE_CAD) < 0)
		DBG("reboot(RB_DISABLE_CAD): %s\n", strerror(errno));
	/* the builder puts this init at INIT_PATH in the initramfs and on a root disk alike */
	if (write_file("/proc/sys/kernel/poweroff_cmd", INIT_PATH " --poweroff", O_TRUNC, 0) < 0)
		DBG("poweroff_cmd: %s\n", strerror(errno));
	setup_network();

	int buttons[4];
	int nbuttons = open_power_buttons(buttons, 4);

	sigset_t watched;
	sigemptyset(&watched);
	int watch[] = { SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGPWR, cfg.stopsig };
	for (size_t i = 0; i < sizeof watch / sizeof watch[0]; i++)
		sigaddset(&watched, watch[i]);
	int sfd = signalfd(-1, &watched, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		die(EXIT_SETUP, "signalfd: %s", strerror(errno));

	if (debug) {
		for (int i = 0; i < cfg.argv.n; i++)
			DBG("argv[%d] = %s\n", i, cfg.argv.v[i]);
		for (int i = 0; i < cfg.env.n; i++)
			DBG("env %s\n", cfg.env.v[i]);
		DBG("cwd %s uid %u gid %u groups %d stopsig %d grace %ds\n", cfg.cwd, (unsigned)cfg.uid,
		    (unsigned)cfg.gid, cfg.ngroups, cfg.stopsig, cfg.grace);
		for (int i = 0; i < cfg.health.n; i++)
			DBG("health[%d] = %s\n", i, cfg.health.v[i]);
		if (cfg.health.n)
			DBG("health interval %lldms timeout %lldms start period %lldms start interval %lldms retries %lld\n",
			    cfg.h_interval, cfg.h_timeout, cfg.h_start, cfg.h_startint, cfg.h_retries);
	}

	pid_t child = fork();
	if (child < 0)
		die(EXIT_SETUP, "fork: %s", strerror(errno));
	if (child == 0) {
		close(sfd);
		enter_container();
		exec_argv(&cfg.argv, 1);
	}
	if (cfg.health.n) {
		hl.state = H_STARTING;
		hl.started = now_ms();
		hl.next = hl.started + health_interval();
	}

	int status = 0, done = 0, killed = 0;
	long long deadline = -1;
	while (!done) {
		struct pollfd pfd[6];
		int n = 0;
		pfd[n++] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		for (int i = 0; i < nbuttons; i++)
			pfd[n++] = (struct pollfd){ .fd = buttons[i], .events = POLLIN };
		int nwatch = n;
		if (hl.fd >= 0)
			pfd[n++] = (struct pollfd){ .fd = hl.fd, .events = POLLIN };
		/* wake for the stop deadline, the next probe (none once stopping) or the running probe's timeout */
		long long wake = deadline;
		long long hwake = !hl.state || deadline >= 0 ? -1 : hl.pid ? (hl.timed_out ? -1 : hl.deadline) : hl.next;
		if (hwake >= 0 && (wake < 0 || hwake < wake))
			wake = hwake;
		int timeout = -1;
		if (wake >= 0) {
			long long left = wake - now_ms();
			timeout = left < 0 ? 0 : left > 1000000000LL ? 1000000000 : (int)left;
		}
		int r = poll(pfd, n, timeout);
		if (r < 0 && errno != EINTR)
			die(EXIT_SETUP, "poll: %s", strerror(errno));
		if (n > nwatch && pfd[nwatch].revents)
			health_read();
		if (hl.state && deadline < 0) {
			if (!hl.pid && now_ms() >= hl.next) {
				health_start();
				if (!hl.pid)
					health_result(-1);
			} else if (hl.pid && !hl.timed_out && now_ms() >= hl.deadline) {
				DBG("health: probe %d timed out\n", (int)hl.pid);
				kill(-hl.pid, SIGKILL);
				kill(hl.pid, SIGKILL);
				hl.timed_out = 1;
			}
		}
		int stop = 0;
		if (deadline >= 0 && now_ms() >= deadline) {
			if (killed) {
				/* unkillable (stuck in the kernel): power off anyway */
				out("xbuild: killed by signal %d (%s)\n", SIGKILL, signame(SIGKILL));
				power_off();
			}
			DBG("grace period over: killing everything\n");
			kill(-1, SIGKILL);
			killed = 1;
			deadline = now_ms() + 5000;
		}
		for (int i = 1; i < nwatch; i++) {
			struct evdev_event ev;
			while (pfd[i].revents && read(pfd[i].fd, &ev, sizeof ev) == (ssize_t)sizeof ev)
				if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1)
					stop = 1;
		}
		struct signalfd_siginfo si;
		while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
			int sig = si.ssi_signo;
			if (sig == SIGCHLD)
				continue;
			if (sig == SIGINT || sig == SIGPWR) {
				stop = 1;
			} else {
				DBG("forwarding %s\n", signame(sig));
				kill(child, sig);
			}
		}
		if (stop && !done) {
			if (deadline < 0) {
				DBG("stop requested: %s to the program, %ds grace\n", signame(cfg.stopsig), cfg.grace);
				kill(child, cfg.stopsig);
				deadline = now_ms() + cfg.grace * 1000LL;
			}
		}
		for (;;) {
			int st;
			pid_t p = waitpid(-1, &st, WNOHANG);
			if (p <= 0)
				break;
			if (p == child) {
				status = st;
				done = 1;
			} else if (p == hl.pid) {
				health_result(st);
			}
		}
	}

	/* the program is gone: so is the rest of the container */
	kill(-1, SIGKILL);
	for (long long end = now_ms() + 2000; now_ms() < end;) {
		pid_t p = waitpid(-1, NULL, WNOHANG);
		if (p < 0)
			break;
		if (p == 0) {
			struct pollfd pfd = { .fd = sfd, .events = POLLIN };
			poll(&pfd, 1, 50);
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si)
				;
		}
	}
	if (WIFEXITED(status))
		out("xbuild: exit status %d\n", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		out("xbuild: killed by signal %d (%s)\n", WTERMSIG(status), signame(WTERMSIG(status)));
	else
		out("xbuild: exit status %d\n", EXIT_SETUP);
	power_off();
}
