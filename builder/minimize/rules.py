"""The rule engine: which paths of an image its entrypoint needs, and the minimized tree.

`Minimizer(tree, config, recipe)` applies the rules listed in builder/minimize/__init__.py: `run()` for
mode auto, `keep`/`need` + `drain()` for what the trace probe adds, `mark` for mode none; `result(mode)`
builds the new Tree (new directory inodes, every other inode shared with the input) and the Report. Each
path keeps the first reason that reaches it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterable

from .. import elf
from ..errors import MinimizeError
from ..image import ImageConfig
from ..recipes import Recipe
from ..tree import DIR, FILE, SYMLINK, Inode, Tree, split
from . import shell
from .packages import package_db, stem
from .report import Report

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BIN_DIRS = {"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin", "usr/games"}
LIB_ROOTS = ("lib", "lib32", "lib64", "usr/lib", "usr/lib32", "usr/lib64", "usr/local/lib")
DOC_PREFIXES = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/locale/",
    "usr/share/lintian/",
    "usr/share/bug/",
    "usr/share/menu/",
    "usr/share/pixmaps/",
    "usr/share/icons/",
    "usr/share/applications/",
    "usr/share/bash-completion/",
    "usr/share/zsh/",
    "usr/share/fish/",
    "usr/share/groff/",
    "usr/share/gtk-doc/",
    "usr/local/share/man/",
    "usr/local/share/doc/",
)
DEV_PREFIXES = ("usr/include/", "usr/lib/pkgconfig/", "usr/share/pkgconfig/", "usr/local/include/")
INIT_PREFIXES = (
    "lib/systemd/",
    "usr/lib/systemd/",
    "usr/share/apport/",
    "usr/lib/tmpfiles.d/",
    "usr/lib/sysusers.d/",
    "usr/share/lintian/",
)
SYSTEM_TOPS = {
    "usr",
    "bin",
    "sbin",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "etc",
    "var",
    "opt",
    "tmp",
    "run",
    "boot",
}
# /etc symlinks whose targets are not kept: commands, certificate hash links duplicating the bundle,
# service-manager wiring
ETC_LINKS_NOT_FOLLOWED = ("etc/alternatives/", "etc/ssl/certs/", "etc/systemd/", "etc/rc", "etc/init.d/")
SCRIPT_MAX = 1 << 20  # bytes of a script read for its shebang and the commands it names
POSITIONAL = re.compile(r'"?\$\{?[@*0-9][^}"]*\}?"?')  # "$@", $1, "${@:2}": the image's Cmd, its args
# An absolute path as a string inside a kept ELF file or script: at least two components
PATH_STRING = re.compile(rb"/[A-Za-z0-9_.+@-]+(?:/[A-Za-z0-9_.+@-]+)+")
# Paths whose keeping another rule decides (locale follows Env, gconv follows iconv_open, docs never)
PATH_STRING_SKIP = ("usr/lib/locale/", "usr/share/zoneinfo/", "proc/", "sys/", "dev/")
# Interpreters that find their modules by name at run time, in directories compiled into them: the
# executed program's name -> (globs of those directories, why). Their ELF extensions enter with their
# closure. (Python has its own rule: python(), which also drops tests and bytecode caches.)
INTERPRETERS = (
    (
        r"perl(5[\d.]*)?",
        (
            "usr/share/perl5",
            "usr/share/perl/*",
            "usr/lib/*-linux-gnu/perl5/*",
            "usr/lib/*-linux-gnu/perl/*",
            "usr/lib/*-linux-gnu/perl-base",
            "usr/local/share/perl/*",
            "usr/local/lib/*-linux-gnu/perl/*",
        ),
        "Perl's @INC: `use`/`require` load modules (and their XS .so) by name at run time",
    ),
    (
        r"ruby[\d.]*",
        (
            "usr/lib/ruby",
            "usr/lib/*-linux-gnu/ruby",
            "usr/share/rubygems-integration",
            "var/lib/gems",
            "usr/local/lib/site_ruby",
        ),
        "Ruby's $LOAD_PATH and gem directories: `require` loads files (and ext .so) by name at run time",
    ),
    (
        r"php[\d.]*",
        ("usr/lib/php", "usr/share/php"),
        "PHP's extension_dir and include_path: php.ini's extension= lines load .so modules by name",
    ),
)
# glibc dlopen()s libgcc_s.so.1 to unwind the stack when a thread is cancelled or exits early
# ("libgcc_s.so.1 must be installed for pthread_cancel to work", then abort)
GLIBC_UNWIND_USERS = {"pthread_cancel", "pthread_exit"}
# glibc runs these through /bin/sh -c (_PATH_BSHELL); without it popen() fails with ENOMEM (glibc reports
# any failed spawn so) and system() returns 127: PostgreSQL's initdb dies on "popen failure"
GLIBC_SHELL_USERS = {"popen", "system", "wordexp"}
# A command line as a C string in such an object, when it is the image's main program (argv[0]/Cmd[0]): a
# command word and an option ("locale -a", which PostgreSQL popen()s to import the system's collations)
POPEN_COMMAND = re.compile(rb"(?<=\x00)([a-z][a-z0-9_.+-]{1,30}) -{1,2}[A-Za-z][^\x00\n]{0,80}(?=\x00)")
# Node.js: the program names it runs as, the files it runs as scripts, the kept files that can be its entry
NODE = re.compile(r"node(js)?[\d.]*")
JS_SUFFIXES = (".js", ".mjs", ".cjs")
ENTRY_REASONS = {"entrypoint", "cmd", "argv", "script", "healthcheck"}
# Plugins a program loads only if present and runs fine without (tree path globs -> why). PostgreSQL's
# JIT provider: jit.c checks that $pkglibdir/llvmjit.so exists and otherwise disables JIT for the
# session; it drags in libLLVM and libz3 (135 MB) and the inlining bitcode (24 MB). Keep them with a
# recipe's keep.paths when JIT matters.
OPTIONAL_PLUGINS = (
    (
        ("usr/lib/postgresql/*/lib/llvmjit*", "usr/lib/postgresql/*/lib/bitcode/*"),
        "PostgreSQL's LLVM JIT provider and its bitcode: without llvmjit.so the server disables JIT",
    ),
)
# A JDK/JRE home ($JAVA_HOME/bin/java next to $JAVA_HOME/lib/modules): what the VM opens by path relative to
# its home, not by linkage (sub-path glob, reason, why). The first match wins; the rest of lib/ is jvm-lib.
JVM_FILES = (
    ("lib/modules", "jvm-modules", "the class library image (jimage) libjvm opens at $JAVA_HOME/lib/modules"),
    ("lib/jvm.cfg", "jvm-cfg", "the launcher reads it to choose the VM variant (lib/VARIANT/libjvm.so)"),
    ("lib/security/cacerts", "jvm-cacerts", "the default TLS trust store (javax.net.ssl)"),
    ("lib/security/*", "jvm-security", "the security providers' policy, blocked certs and public suffixes"),
    ("conf/security/*", "jvm-security", "java.security: the providers and algorithms the class library uses"),
    ("lib/tzdb.dat", "jvm-tzdb", "the time-zone rules java.time and java.util.TimeZone read"),
    ("conf/*", "jvm-conf", "configuration the class library reads (net.properties, logging.properties)"),
    ("lib/jspawnhelper", "jvm-helper", "ProcessBuilder/Runtime.exec start child processes through it"),
    ("lib/*.so", "jvm-native", "native libraries of the JDK modules, System.loadLibrary()ed by name"),
)
# the class-data-sharing archive for -XX:-UseCompressedOops (heaps of 32 GB and more): -Xshare:auto runs
# without it; lib/src.zip and lib/ct.sym serve the compiler and IDEs, never a running program
JVM_UNUSED = (
    ("lib/*/classes_nocoops.jsa", "CDS archive for -XX:-UseCompressedOops heaps; -Xshare:auto runs without"),
    ("lib/src.zip", "the class library's sources (IDEs, debuggers)"),
    ("lib/ct.sym", "javac --release's symbol table (the compiler, not a running program)"),
)
PY_DROP = ("test/", "tests/", "idlelib/", "tkinter/", "turtledemo/", "ensurepip/", "lib2to3/tests/")


def _is_doc(path: str) -> bool:
    return path.startswith(DOC_PREFIXES) or "/man/man" in path


def _optional_plugin(path: str) -> str | None:
    """Why `path` is an OPTIONAL_PLUGINS file, or None."""
    for globs, why in OPTIONAL_PLUGINS:
        if any(fnmatch.fnmatchcase(path, g) for g in globs):
            return why
    return None


def _in_lib(path: str) -> tuple[bool, bool]:
    """(is under a library root, is directly in a library dir [root or multiarch dir])."""
    d = path.rsplit("/", 1)[0] if "/" in path else ""
    for r in LIB_ROOTS:
        if d == r or (
            d.startswith(r + "/")
            and d.count("/") == r.count("/") + 1
            and d.rsplit("/", 1)[1].endswith("-linux-gnu")
        ):
            return True, True
        if d.startswith(r + "/"):
            return True, False
    return False, False


class Minimizer:
    """One minimization of one tree (module doc); the input tree is never mutated."""

    def __init__(self, tree: Tree, config: ImageConfig, recipe: Recipe | None, arch: str | None = None):
        self.tree, self.config, self.recipe = tree, config, recipe
        self.arch = arch  # the image's architecture (OCI name): its entrypoint's programs must be for it
        self.env = dict(e.split("=", 1) for e in config.env if "=" in e)
        self.path_dirs = [d for d in self.env.get("PATH", DEFAULT_PATH).split(":") if d]
        self.cwd = "/".join(split(config.working_dir or "/"))
        self.resolver = elf.Resolver(tree, config.env)
        self.kept: dict[str, tuple[str, str]] = {}  # real tree path -> (reason, detail)
        self.dropped_why: dict[str, tuple[str, str]] = {}
        self.notes: list[str] = []
        self.todo: list[tuple[str, str, str, bool]] = []  # (path, reason, detail, strict)
        self.done: set[str] = set()
        self.objects: list[elf.Loaded] = []
        self.executed: set[str] = set()  # real paths of programs something runs
        self.primary: set[str] = set()  # argv[0] / Cmd[0]
        self.data_dirs: list[tuple[str, str, str]] = []  # argv / WorkingDir directories
        self.scanned: set[str] = set()  # real paths of files read as shell code
        self.shell_files: list[str] = []  # sourced / `sh FILE`: to read as shell code

    # -- bookkeeping --------------------------------------------------------------------------
    def mark(self, real: str, reason: str, detail: str = "") -> None:
        if real and real not in self.kept:
            self.kept[real] = (reason, detail)

    def keep(self, path: str, reason: str, detail: str = "") -> str | None:
        """Keep `path`, every symlink met on the way and the final file; the real path, or None."""
        for link in elf.symlink_chain(self.tree, path):
            self.mark(link, reason, f"symlink on the way to /{path}" + (f"; {detail}" if detail else ""))
        try:
            real = self.tree.real_path(path)
        except LookupError:
            self.notes.append(f"/{path}: too many levels of symbolic links ({reason})")
            return None
        node = self.tree.lookup(real)
        if node is None:
            return None
        self.mark(real, reason, detail)
        if node.kind == DIR:
            for sub, n in _walk_from(node, real):
                if n.kind != DIR:
                    self.mark(sub, reason, f"under /{real}" + (f"; {detail}" if detail else ""))
        return real

    def need(self, path: str, reason: str, detail: str = "", strict: bool = False) -> None:
        """Keep `path` and whatever running it needs (ELF closure, shebang, script contents)."""
        self.todo.append((path, reason, detail, strict))

    def missing(self, msg: str, strict: bool) -> None:
        """Something a kept path needs is not in the image: a MinimizeError if `strict` (the
        entrypoint's own closure), else a note in the report."""
        if strict:
            raise MinimizeError(msg) from None
        self.notes.append(msg)

    # -- the rules ------------------------------------------------------------------------------
    def run(self) -> None:
        self.entry()
        self.healthcheck()
        self.drain()
        for args in self.data_dirs:
            self.data_dir(*args)
        self.drain()
        self.node()
        self.drain()
        self.glibc()
        self.locales()
        if self.recipe:
            for p in self.recipe.keep_paths:
                self.keep_tree(p, "recipe", f"keep.paths {p}")
            for g in self.recipe.keep_globs:
                for p in elf.glob(self.tree, g):
                    self.keep_tree(p, "recipe", f"keep.globs {g}")
        self.drain()
        self.packages()
        self.drain()
        self.etc()
        self.glibc()  # packages may have added objects importing iconv_open
        self.drain()
        self.path_strings()
        self.drain()
        self.link_targets()
        self.drain()

    def keep_tree(self, path: str, reason: str, detail: str) -> None:
        real = self.keep(path, reason, detail)
        if real is None:
            self.notes.append(f"{detail}: /{'/'.join(split(path))} is not in the image")
            return
        node = self.tree.lookup(real)
        items = _walk_from(node, real) if node is not None and node.kind == DIR else [(real, node)]
        for sub, n in items:
            if n is None or n.kind != FILE:
                continue
            if n.mode & 0o111 or sub.endswith((".so", ".node")) or ".so." in sub:  # + ELF closure
                self.need(sub, reason, detail)

    def entry(self) -> None:
        c = self.config
        argv = list(c.entrypoint) + list(c.cmd) if c.entrypoint else list(c.cmd)
        if not argv:
            raise MinimizeError("the image has neither Entrypoint nor Cmd: nothing to run")
        first = self.command(argv[0])
        if first is None and "/" in argv[0]:
            try:
                self.tree.real_path(argv[0] if argv[0].startswith("/") else f"{self.cwd}/{argv[0]}")
            except LookupError as e:
                raise MinimizeError(f"entrypoint {argv[0]!r}: {e}") from None
        if first is None:
            raise MinimizeError(
                f"entrypoint {argv[0]!r} not found in the image"
                + ("" if "/" in argv[0] else f" (PATH={':'.join(self.path_dirs)})")
            )
        self.primary.add(self.tree.real_path(first))
        self.need(first, "entrypoint", f"argv[0] {argv[0]!r}", strict=True)
        if c.entrypoint and c.cmd:
            cmd0 = self.command(c.cmd[0])
            if cmd0 is not None:
                self.primary.add(self.tree.real_path(cmd0))
                self.need(cmd0, "cmd", f"Cmd[0] {c.cmd[0]!r}", strict=True)
        base = argv[0].rsplit("/", 1)[-1]
        for i, word in enumerate(argv[1:], 1):
            if base in shell.SHELLS and argv[i - 1] == "-c":
                continue
            p = word if word.startswith("/") else f"{self.cwd}/{word}"
            node = self.tree.lookup(p, follow=True)
            if node is not None and node.kind == FILE and word not in ("-c",):
                self.need("/".join(split(p)), "argv", f"argv[{i}] {word!r}")
            elif node is not None and node.kind == DIR and ("/" in word or word == "."):
                self.data_dirs.append((p, "argv", f"argv[{i}] {word!r} names a directory"))
        # the command line as shell code: the program a wrapper runs (tini -- X, gosu U X), `sh -c TEXT`
        self.shell_text(
            shlex.join(argv).encode("utf-8", "replace"), "the image's Entrypoint+Cmd", data=True, inline=True
        )
        if self.cwd:
            self.data_dirs.append((self.cwd, "workdir", f"WorkingDir {c.working_dir}"))

    def healthcheck(self) -> None:
        """The HEALTHCHECK's probe runs in the guest too (guest.health_probe): CMD's program and the files
        its words name, or CMD-SHELL's shell and what its text runs. A probe command that is not in the
        image is a note (Docker would run it and call the container unhealthy), not an error."""
        hc = self.config.healthcheck
        if hc is None or not hc.test or hc.disabled:
            return
        shell_form = hc.test[0] == "CMD-SHELL"
        argv = [*(self.config.shell or ("/bin/sh", "-c")), *hc.test[1:2]] if shell_form else list(hc.test[1:])
        first = self.command(argv[0])
        if first is None:
            self.missing(f"HEALTHCHECK: {argv[0]!r} is not in the image", strict=False)
            return
        self.need(first, "healthcheck", f"HEALTHCHECK argv[0] {argv[0]!r}")
        if shell_form:
            self.shell_text(argv[-1].encode("utf-8", "surrogateescape"), "HEALTHCHECK", inline=True)
            return
        for word in argv[1:]:
            if word.startswith("/") and (node := self.tree.lookup(word, follow=True)) and node.kind == FILE:
                self.need("/".join(split(word)), "healthcheck", f"HEALTHCHECK word {word!r}")

    def data_dir(self, path: str, reason: str, detail: str) -> None:
        """Keep an application's data directory (an argv word, WorkingDir) with everything below,
        unless it is a system directory (/, /usr, /etc, /var, ...: those are what minimizing is for)."""
        try:
            real = self.tree.real_path(path)
        except LookupError:
            return
        top = real.split("/")[0]
        if not real or top in SYSTEM_TOPS and real.count("/") < 2 or top in ("proc", "sys", "dev"):
            return
        self.keep_tree(real, reason, detail)

    def command(self, name: str) -> str | None:
        """Resolve a command like execvp inside the tree: a tree path, or None."""
        if not name:
            return None
        if "/" in name:
            p = "/".join(split(name if name.startswith("/") else f"{self.cwd}/{name}"))
            node = self.tree.lookup(p, follow=True)
            return p if node is not None and node.kind == FILE else None
        for d in self.path_dirs:
            p = "/".join(split(d if d.startswith("/") else f"{self.cwd}/{d}") + [name])
            node = self.tree.lookup(p, follow=True)
            if node is not None and node.kind == FILE and node.mode & 0o111:
                return p
        return None

    def drain(self) -> None:
        while self.todo or self.shell_files:
            if not self.todo:
                self.shell_file(self.shell_files.pop(0))
                continue
            path, reason, detail, strict = self.todo.pop(0)
            try:
                real = self.tree.real_path(path)
            except LookupError:
                self.missing(f"/{path}: too many levels of symbolic links ({reason} {detail})", strict)
                continue
            self.keep(path, reason, detail)
            if real in self.done:
                continue
            self.done.add(real)
            node = self.tree.lookup(real)
            if node is None or node.kind != FILE:
                continue
            head = elf._head(node, 256)
            if head[:4] == elf.ELF_MAGIC:
                self.elf(path, strict)
            elif head[:2] == b"#!":
                self.script(real, node, strict)

    def check_machine(self, path: str, what: str) -> None:
        """MinimizeError if `path` is an ELF program for another machine than the image's architecture:
        the guest could not run it (exec format error) and no kernel of that architecture is paired."""
        info = self.resolver.info(path)
        want = elf.MACHINES.get(self.arch or "")
        if info is not None and want is not None and info.machine != want:
            raise MinimizeError(
                f"{what} /{path} is an {info.machine} program, but the image says linux/{self.arch} "
                f"({want}): a linux/{self.arch} guest cannot run it"
            )

    def elf(self, path: str, strict: bool) -> None:
        if strict:
            self.check_machine(path, "the entrypoint's")
        objs, missing = self.resolver.closure(path, strict=strict)
        self.notes += missing
        interp = objs[0].info.interp if objs else None
        for o in objs[1:]:
            why = "PT_INTERP" if o.needed_by == path and o.name == interp else f"DT_NEEDED {o.name}"
            self.keep(o.path, "elf-closure", f"{why} of /{o.needed_by}")
        self.objects += objs
        real = objs[0].real if objs else path
        self.executed.add(real)
        self.python(real, via=path)
        if real.endswith("/bin/java"):
            self.jvm(real.rsplit("/", 2)[0])

    def script(self, real: str, node: Inode, strict: bool) -> None:
        self.executed.add(real)
        text = elf._head(node, SCRIPT_MAX)  # a shell script with a payload (makeself) is not read whole
        line = text.split(b"\n", 1)[0][2:].decode("utf-8", "replace").strip()
        words = line.split()
        if not words:
            return
        interp = words[0]
        ip = self.command(interp) if interp.startswith("/") else None
        if ip is None:
            self.missing(f"/{real}: interpreter {interp} is not in the image", strict)
            return
        self.need(ip, "shebang", f"#! of /{real}", strict)
        name = interp.rsplit("/", 1)[-1]
        args = [w for w in words[1:] if not w.startswith("-")]
        if name == "env" and args:
            target = self.command(args[0])
            if target is None:
                self.missing(f"/{real}: interpreter {args[0]!r} (via env) not found on PATH", strict)
                return
            self.need(target, "shebang", f"#! /usr/bin/env {args[0]} of /{real}", strict)
            name = args[0]
        if name in shell.SHELLS or name == "busybox" or re.fullmatch(r"(ba|da|a|k|mk|z)?sh", name):
            self.shell_file(real, text)

    def shell_file(self, path: str, text: bytes | None = None) -> None:
        """Read a file as shell code once (its first MiB: a script with a payload is not read whole)."""
        try:
            real = self.tree.real_path(path)
        except LookupError:
            return
        node = self.tree.lookup(real)
        if real in self.scanned or node is None or node.kind != FILE:
            return
        self.scanned.add(real)
        self.shell_text(elf._head(node, SCRIPT_MAX) if text is None else text, f"/{real}")

    def shell_text(self, text: bytes, where: str, data: bool = False, inline: bool = False) -> None:
        """Follow what shell code runs and names (shell.scan): every command it can run is kept with the
        construct that runs it (detail "`exec gosu` in /docker-entrypoint.sh"), files it sources or runs
        with a shell (`. FILE`, `sh FILE`) are kept and read as shell code whatever their first line, the
        absolute paths it mentions are followed (`mentioned`). Commands named by an expansion other than
        the positional parameters, and what the scan could not read, are notes. `inline`: code from a
        command line, where $0 is not a script."""
        s = shell.scan(text, inline=inline)
        for c in s.commands:
            p = self.command(c.name)
            if p is not None:
                self.need(p, "script", f"`{c.construct()}` in {where}")
        for c in s.scripts:
            p = self.script_file(c.name)
            if p is None:
                self.notes.append(f"{where}: `{c.construct()}`: {c.name} is not in the image")
                continue
            self.need(p, "script", f"`{c.construct()}` in {where}")
            self.shell_files.append(p)
        for path in s.paths:
            self.mentioned(path, where, data)
        unknown = [c for c in s.dynamic if not POSITIONAL.fullmatch(c.name)]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            self.notes.append(
                f"{where}: commands named by expansions are not followed: "
                + ", ".join(f"`{c.construct()}` (line {c.line})" for c in unknown[:5])
                + more
            )
        self.notes += [f"{where}: {p}" for p in s.problems]

    def script_file(self, name: str) -> str | None:
        """A file read as shell code (`. NAME`, `sh NAME`) as a tree path: a path (relative to the
        WorkingDir), else searched on PATH and then in the WorkingDir as bash's `.` does."""
        dirs = [""] if "/" in name else [*self.path_dirs, "."]
        for d in dirs:
            full = f"{d}/{name}" if d else name
            p = "/".join(split(full if full.startswith("/") else f"{self.cwd}/{full}"))
            node = self.tree.lookup(p, follow=True)
            if node is not None and node.kind == FILE:
                return p
        return None

    def mentioned(self, word: str, where: str, data: bool = False) -> None:
        """An absolute path a script mentions: a file is kept, a directory of hooks gives its scripts, a
        directory without scripts is data (`httpd -h /srv/www`) and kept whole, as is a directory named
        by the image's own command line (`sh -c TEXT`), like an argv directory."""
        word = word.split("$", 1)[0]
        if not word or word == "/":
            return
        paths = elf.glob(self.tree, word) if any(c in word for c in "*?[") else ["/".join(split(word))]
        for p in paths:
            node = self.tree.lookup(p, follow=True)
            if node is None:
                continue
            if node.kind == FILE:
                self.need(p, "script", f"path mentioned in {where}")
            elif node.kind == DIR and p.split("/")[0] not in (
                "",
                "usr",
                "bin",
                "sbin",
                "lib",
                "lib64",
                "proc",
                "sys",
                "dev",
                "tmp",
                "run",
                "var",
            ):
                real = self.tree.real_path(p)
                if data:
                    self.data_dirs.append((real, "argv", f"/{p} named in {where}"))
                    continue
                hooks = [
                    sub
                    for sub, n in _walk_from(node, real)
                    if n.kind == FILE and (n.mode & 0o111 or sub.endswith(".sh"))
                ]
                if not hooks:  # no scripts in it: data the script hands a program (httpd -h /srv/www)
                    self.keep_tree(real, "script", f"data directory /{p} named in {where}")
                for sub in hooks:
                    self.need(sub, "script", f"in /{p}, mentioned in {where}")

    def interpreter(self, real: str) -> None:
        """An executed interpreter of INTERPRETERS: its module directories, ELF extensions followed."""
        name = real.rsplit("/", 1)[-1]
        for pattern, globs, why in INTERPRETERS:
            if not re.fullmatch(pattern, name):
                continue
            for g in globs:
                for d in elf.glob(self.tree, g):
                    node = self.tree.lookup(d, follow=True)
                    if node is None or node.kind != DIR:
                        continue
                    rd = self.tree.real_path(d)
                    for sub, n in _walk_from(node, rd):
                        if n.kind == DIR:
                            continue
                        self.mark(sub, f"interpreter:{name}", f"{why} (/{d}, for /{real})")
                        if n.kind == FILE and ".so" in sub.rsplit("/", 1)[-1]:
                            self.need(sub, f"interpreter:{name}", f"{why} (/{d}, for /{real})")

    def python(self, real: str, via: str = "") -> None:
        """Python's stdlib and site/dist-packages; `via` (the path it was run as) in a virtual environment
        (DIR/bin/python next to DIR/pyvenv.cfg: `python -m venv`, uvicorn's #!/opt/venv/bin/python3)
        adds that environment's site-packages."""
        name = real.rsplit("/", 1)[-1]
        m = re.fullmatch(r"python(\d(?:\.\d+)?)?m?", name)
        if not m:
            self.interpreter(real)
            return
        prefix = real.rsplit("/", 2)[0] if real.count("/") >= 1 else ""
        venv = "/".join(split(via)[:-2])
        in_venv = bool(venv) and self.tree.lookup(f"{venv}/pyvenv.cfg") is not None
        if in_venv:  # without it python does not know it runs in the venv: no site-packages
            self.keep(f"{venv}/pyvenv.cfg", f"interpreter:{name}", f"marks /{venv} as the venv of /{via}")
        prefixes = list(dict.fromkeys([prefix, "usr", "usr/local"] + ([venv] if in_venv else [])))
        ver = m.group(1) or ""
        dirs: list[str] = []
        for pre in prefixes:
            for pat in (
                f"{pre}/lib/python{ver}*" if "." not in ver else f"{pre}/lib/python{ver}",
                f"{pre}/lib/python3/dist-packages",
            ):
                dirs += elf.glob(self.tree, pat)
        detail = f"stdlib of /{real}"
        for d in dict.fromkeys(dirs):
            node = self.tree.lookup(d, follow=True)
            if node is None or node.kind != DIR:
                continue
            rd = self.tree.real_path(d)
            for sub, n in _walk_from(node, rd):
                rel = sub[len(rd) + 1 :]
                if n.kind == DIR:
                    continue
                if "__pycache__/" in sub:
                    self.dropped_why.setdefault(sub, ("interpreter-cache", f"{detail}: bytecode is rebuilt"))
                    continue
                if rel.startswith(PY_DROP) or "/tests/" in rel and rel.count("/") <= 2:
                    self.dropped_why.setdefault(sub, ("interpreter-tests", f"{detail}: tests/IDE/GUI"))
                    continue
                self.mark(sub, f"interpreter:{name}", detail)
                if n.kind == FILE and (".so" in sub.rsplit("/", 1)[-1]):
                    self.need(sub, f"interpreter:{name}", detail)

    def node(self) -> None:
        """When a kept program runs as node: what `require`/`import` resolve from the app's entry scripts
        (kept .js/.mjs/.cjs files and node-shebang scripts that the command line or a script names,
        directories named by argv, the WorkingDir), wherever they are. From each, like Node's resolver:
        the package root (the nearest directory with a package.json: the app's own files, its "type",
        relative requires) kept whole unless it is a bin directory, the files its package.json "main" and
        "exports" name, and every node_modules directory on the way up to / with everything in it (native
        .node addons followed into their ELF closure; a package linked in from elsewhere, as npm
        workspaces do, is followed to its directory); and the directories of NODE_PATH."""
        if not any(NODE.fullmatch(r.rsplit("/", 1)[-1]) for r in self.executed):
            return
        starts: list[tuple[str, str]] = []  # (directory, the file or setting it comes from)
        for path, (reason, _) in sorted(self.kept.items()):
            node = self.tree.lookup(path)
            if reason not in ENTRY_REASONS or node is None or node.kind != FILE:
                continue
            head = elf._head(node, 128).split(b"\n", 1)[0]
            if path.endswith(JS_SUFFIXES) or head.startswith(b"#!") and re.search(rb"[/ ]node(js)?\b", head):
                starts.append((path.rsplit("/", 1)[0] if "/" in path else "", f"/{path}"))
        starts += [(self.tree.real_path(d), detail) for d, why, detail in self.data_dirs if why == "argv"]
        if self.cwd:
            starts.append((self.cwd, f"WorkingDir /{self.cwd}"))
        for d in self.env.get("NODE_PATH", "").split(":"):
            if d.startswith("/") and (n := self.tree.lookup(d, follow=True)) is not None and n.kind == DIR:
                self.keep_tree(d, "node-modules", f"NODE_PATH {d}")
        seen: set[str] = set()
        while starts:
            d, src = starts.pop(0)
            if d in seen:
                continue
            seen.add(d)
            parts = split(d)
            roots = ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]
            for r in roots:
                mods = f"{r}/node_modules".lstrip("/")
                n = self.tree.lookup(mods, follow=True)
                if n is None or n.kind != DIR or mods in seen:
                    continue
                seen.add(mods)
                self.keep_tree(mods, "node-modules", f"require()/import from {src} search it")
                real = self.tree.real_path(mods)
                for sub, ln in _walk_from(self.tree.lookup(real) or n, real):
                    if ln.kind == SYMLINK and (t := self.tree.lookup(sub, follow=True)) and t.kind == DIR:
                        starts.append((self.tree.real_path(sub), f"/{sub} (a linked package)"))
            pkg = next(
                (r for r in roots if self.tree.lookup(f"{r}/package.json".lstrip("/")) is not None), None
            )
            if pkg is not None:
                self.node_package(pkg, src)

    def node_package(self, root: str, src: str) -> None:
        """A Node package root found from `src`: its package.json, the directory whole (unless a bin or
        system directory) and the files "main" and "exports" name."""
        pj = f"{root}/package.json".lstrip("/")
        self.keep(pj, "node-package", f'the package scope of {src}: its "type", "main" and "exports"')
        if root and root not in BIN_DIRS and not (root.split("/")[0] in SYSTEM_TOPS and root.count("/") < 2):
            self.keep_tree(root, "node-package", f"the package of {src}: its own modules")
        try:
            doc = json.loads(self.tree.read(pj))
        except (FileNotFoundError, ValueError):
            return
        targets: list[str] = []
        stack: list[object] = [doc.get("main"), doc.get("exports")] if isinstance(doc, dict) else []
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                targets.append(v)
            elif isinstance(v, dict):
                stack += list(v.values())
            elif isinstance(v, list):
                stack += v
        for t in targets:
            if "*" in t or t.startswith("/"):
                continue
            p = "/".join(split(f"{root}/{t}"))
            for cand in (p, *(p + s for s in (*JS_SUFFIXES, ".json", ".node", "/index.js"))):
                n = self.tree.lookup(cand, follow=True)
                if n is not None and n.kind == FILE:
                    self.need(cand, "node-package", f'"main"/"exports" of /{pj}')
                    break

    def jvm(self, home: str) -> None:
        """A java launcher ran from `home`/bin: the files the VM opens relative to its home (JVM_FILES, each
        with its own reason), the VM variants jvm.cfg marks KNOWN (lib/VARIANT/libjvm.so is dlopen()ed by the
        launcher, not linked; its CDS archive classes.jsa speeds start-up), and the rest of lib/ (fonts,
        properties the class library reads by name), minus JVM_UNUSED and the directories of the variants
        that are not KNOWN. With or without a package database
        (eclipse-temurin's /opt/java/openjdk belongs to no package)."""
        node = self.tree.lookup(home, follow=True)
        if node is None or node.kind != DIR or self.tree.lookup(f"{home}/lib/modules", follow=True) is None:
            return
        if home in self.done:
            return
        self.done.add(home)
        unused = {
            self.tree.real_path(p): why for g, why in JVM_UNUSED for p in elf.glob(self.tree, f"{home}/{g}")
        }
        for p, why in unused.items():
            self.dropped_why.setdefault(p, ("jvm-unused", why))
        try:
            cfg = self.tree.read(f"{home}/lib/jvm.cfg").decode("utf-8", "replace")
        except FileNotFoundError:
            cfg = "-server KNOWN\n"
        rows = [line.split() for line in cfg.splitlines()]
        variants = [w[0].lstrip("-") for w in rows if len(w) > 1 and w[1] == "KNOWN"]
        for v in variants:
            for p in elf.glob(self.tree, f"{home}/lib/{v}/libjvm.so"):
                why = f"VM variant {v!r} KNOWN in /{home}/lib/jvm.cfg (dlopen()ed)"
                self.keep(p, "jvm-libjvm", why)
                self.need(p, "jvm-libjvm", why)
            for p in elf.glob(self.tree, f"{home}/lib/{v}/classes.jsa"):
                self.keep(p, "jvm-cds", "the default class-data-sharing archive: faster start-up")
        for g, reason, why in JVM_FILES:
            for p in elf.glob(self.tree, f"{home}/{g}"):
                n = self.tree.lookup(p, follow=True)
                detail = f"{why} (/{home})"
                if n is None or self.tree.real_path(p) in unused:
                    continue
                if n.kind == DIR:
                    self.keep_tree(p, reason, detail)
                else:
                    self.keep(p, reason, detail)
                    if n.kind == FILE and (n.mode & 0o111 or p.endswith(".so")):
                        self.need(p, reason, detail)
        lib = self.tree.real_path(f"{home}/lib")
        lib_node = self.tree.lookup(lib)
        # the directories of variants jvm.cfg does not mark KNOWN (IGNORE, WARN, ERROR): never loaded
        other = tuple(f"{lib}/{w[0].lstrip('-')}/" for w in rows if len(w) > 1 and w[1] != "KNOWN")
        for sub, n in _walk_from(lib_node, lib) if lib_node is not None else []:
            if n.kind != DIR and sub not in self.kept and sub not in unused and not sub.startswith(other):
                self.mark(sub, "jvm-lib", f"read by name from $JAVA_HOME/lib by the class library (/{home})")

    def glibc(self) -> None:
        libcs = [o for o in self.objects if o.real.rsplit("/", 1)[-1].startswith("libc.so.")]
        if not libcs:
            return
        libdir = libcs[0].real.rsplit("/", 1)[0]
        try:
            conf = self.tree.read("etc/nsswitch.conf").decode("utf-8", "replace")
        except FileNotFoundError:
            conf = "passwd: files\ngroup: files\nhosts: files dns\n"
        services = {"files", "dns"}
        for line in conf.splitlines():
            line = line.split("#", 1)[0]
            if ":" in line:
                services |= {w for w in line.split(":", 1)[1].split() if not w.startswith("[")}
        for svc in sorted(services):
            for p in elf.glob(self.tree, f"{libdir}/libnss_{svc}.so*"):
                if p not in self.done:
                    self.need(p, "glibc-nss", f"service {svc!r} of /etc/nsswitch.conf")
        unwinders = [o.path for o in self.objects if o.info.undefined & GLIBC_UNWIND_USERS]
        for p in elf.glob(self.tree, f"{libdir}/libgcc_s.so.1") if unwinders else []:
            if p not in self.done:
                self.need(p, "glibc-libgcc", f"/{unwinders[0]} imports pthread_cancel/pthread_exit")
        shells = [o.path for o in self.objects if o.info.undefined & GLIBC_SHELL_USERS]
        sh = self.command("/bin/sh") if shells else None
        if sh is not None and self.tree.real_path(sh) not in self.done:
            self.need(sh, "glibc-sh", f"/{shells[0]} imports popen/system: glibc runs /bin/sh -c")
        # only the image's main programs: a multi-call binary run on the side (busybox httpd) names its
        # other applets' command lines ("umount -a -r" of its init) that the container never runs
        for o in self.objects if sh is not None else []:
            node = self.tree.lookup(o.real)
            if not o.info.undefined & GLIBC_SHELL_USERS or node is None or o.real not in self.primary:
                continue
            for m in POPEN_COMMAND.finditer(elf._head(node, node.size)):
                prog = self.command(m.group(1).decode())
                if prog is not None:
                    line = m.group(0).decode("ascii", "replace")
                    self.need(prog, "popen-command", f"`{line}` in /{o.path}, run with popen/system")
        # libstdc++ imports iconv_open only for the codecvt facets of named locales (which need locale
        # data we only keep for LANG/LC_*); glibc's built-in converters (UTF-8, ASCII, ISO-8859-1, UCS-2/4,
        # UTF-16/32) need no module. So gconv is kept only for another importer of iconv_open.
        users = [
            o.path
            for o in self.objects
            if "iconv_open" in o.info.undefined and not o.real.rsplit("/", 1)[-1].startswith("libstdc++.")
        ]
        for d in elf.glob(self.tree, f"{libdir}/gconv"):
            if users:
                if d not in self.done:
                    self.done.add(d)
                    self.keep_tree(d, "glibc-gconv", f"/{users[0]} imports iconv_open")
            else:
                rd = self.tree.real_path(d)
                node = self.tree.lookup(rd)
                for sub, _n in _walk_from(node, rd) if node else []:
                    self.dropped_why.setdefault(sub, ("gconv-unused", "no kept object imports iconv_open"))

    def locales(self) -> None:
        names = {v for k, v in self.env.items() if k == "LANG" or k.startswith("LC_")} - {"", "C", "POSIX"}
        for n in sorted(names):
            cands = {n, n.replace("UTF-8", "utf8"), n.replace("utf8", "UTF-8")}
            found = False
            for c in sorted(cands):
                for base in ("usr/lib/locale", "usr/local/lib/locale"):
                    if self.tree.lookup(f"{base}/{c}", follow=True) is not None:
                        self.keep_tree(f"{base}/{c}", "locale", f"Env {n}")
                        found = True
            # not a directory of its own: glibc looks it up in the archive localedef builds by default
            archive = "usr/lib/locale/locale-archive"
            if not found and self.tree.lookup(archive, follow=True) is not None:
                self.keep(
                    archive,
                    "locale",
                    f"Env {n}: not a directory in /usr/lib/locale, so glibc reads it from the locale archive",
                )

    def packages(self) -> None:
        db = package_db(self.tree)
        if not db.owners:
            return
        kept_pkgs: dict[str, str] = {}
        apps: set[str] = set()
        for real in list(self.kept):
            for pkg in db.owners.get(real, ()):
                kept_pkgs.setdefault(pkg, f"owns /{real}")
                if real in self.executed:
                    apps.add(pkg)
        for prog in sorted(self.primary):
            for pkg in db.owners.get(prog, ()):
                for dep in db.depends.get(pkg, ()):
                    if dep in db.files and stem(dep) == stem(pkg):
                        kept_pkgs.setdefault(dep, f"{pkg} depends on it (runs /{prog})")
        for pkg, why in sorted(kept_pkgs.items()):
            for real in db.files.get(pkg, ()):
                if real in self.kept:
                    continue
                node = self.tree.lookup(real)
                if node is None or node.kind == DIR:
                    continue
                d = real.rsplit("/", 1)[0] if "/" in real else ""
                if _is_doc(real):
                    self.dropped_why.setdefault(real, ("doc", f"docs, man pages and locales of {pkg}"))
                    continue
                if real.startswith(DEV_PREFIXES) or real.endswith((".a", ".pc", ".h")):
                    self.dropped_why.setdefault(real, ("dev", f"headers/static libs of {pkg}"))
                    continue
                if real.startswith(INIT_PREFIXES):
                    self.dropped_why.setdefault(
                        real,
                        (
                            "init-system",
                            f"service-manager files of {pkg}: the guest's init runs the entrypoint directly",
                        ),
                    )
                    continue
                if d in BIN_DIRS:
                    self.dropped_why.setdefault(
                        real, (f"package-command:{pkg}", "a command of an owning package that nothing runs")
                    )
                    continue
                if "/gconv/" in f"/{real}" and real in self.dropped_why:
                    continue
                under_lib, direct = _in_lib(real)
                is_elf = node.kind == FILE and elf._head(node, 4) == elf.ELF_MAGIC
                if is_elf and (direct or pkg not in apps or not (under_lib or "/libexec/" in f"/{real}")):
                    self.dropped_why.setdefault(
                        real,
                        (
                            f"package-library:{pkg}",
                            "a library or plugin of an owning package that no kept object loads",
                        ),
                    )
                    continue
                optional = _optional_plugin(real)
                if optional:
                    self.dropped_why.setdefault(real, ("optional-plugin", optional))
                if real in self.dropped_why:
                    continue
                self.mark(real, f"package:{pkg}", why)
                if is_elf:
                    self.need(real, f"package:{pkg}", f"plugin of {pkg} ({why})")

    def etc(self) -> None:
        node = self.tree.lookup("etc", follow=True)
        if node is None or node.kind != DIR:
            return
        real_etc = self.tree.real_path("etc")
        for sub, n in _walk_from(node, real_etc):
            if n.kind == DIR:
                continue
            self.mark(sub, "etc", "")
            if n.kind == SYMLINK and not sub.startswith(ETC_LINKS_NOT_FOLLOWED):
                try:
                    t = self.tree.real_path(sub)
                except LookupError:
                    continue
                tn = self.tree.lookup(t)
                if (
                    tn is not None
                    and tn.kind == FILE
                    and not t.startswith("etc/")
                    and t not in self.kept
                    and elf._head(tn, 4) != elf.ELF_MAGIC
                ):
                    self.keep(sub, "etc-link", f"target of /{sub}")

    def path_strings(self) -> None:
        """Absolute paths written as strings in kept ELF files and scripts (Debian's libnode loads its
        externalized builtins from /usr/share/nodejs/... by a path compiled in; programs open data files
        of other packages by absolute path): each that names an existing regular file that is data (not
        ELF, not a script, not executable: postgres names /usr/bin/prove, a Perl script that would bring
        all of Perl; its keeping not decided by another rule) is kept. Only what runs is read: the loaded ELF
        objects and the executed scripts (not every script under /etc). Directories are not taken whole."""
        for real in sorted({o.real for o in self.objects} | self.executed):
            node = self.tree.lookup(real)
            if node is None or node.kind != FILE:
                continue
            head = elf._head(node, 4)
            if head != elf.ELF_MAGIC and head[:2] != b"#!":
                continue
            data = elf._head(node, node.size if head == elf.ELF_MAGIC else SCRIPT_MAX)
            for m in sorted(set(PATH_STRING.findall(data))):
                p = "/".join(split(m.decode("ascii")))
                if p in self.kept or p.startswith(PATH_STRING_SKIP) or _is_doc(p) or "/gconv/" in f"/{p}":
                    continue
                hit = self.tree.lookup(p, follow=True)
                if hit is None or hit.kind != FILE:
                    continue
                hhead = elf._head(hit, 4)
                if hit.mode & 0o111 or hhead == elf.ELF_MAGIC or hhead[:2] == b"#!":
                    continue  # a program enters when something runs it, not because its name is known
                try:
                    target = self.tree.real_path(p)
                except LookupError:
                    continue
                if target in self.kept:
                    self.keep(p, "path-string", f"named as a string in /{real}")
                else:
                    self.need(p, "path-string", f"named as a string in /{real}")

    def link_targets(self) -> None:
        """No kept symlink dangles: a kept symlink whose target file was dropped gets its target when it
        is data (a config or sample linked into place); one that points at a program nothing runs, a
        service-manager unit or a doc, and the links of ETC_LINKS_NOT_FOLLOWED (/etc/alternatives, the
        /etc/ssl/certs hash links whose certificates the kept bundle already holds) are dropped in
        result()."""
        for path in sorted(self.kept):
            node = self.tree.lookup(path)
            if node is None or node.kind != SYMLINK or path.startswith(ETC_LINKS_NOT_FOLLOWED):
                continue
            try:
                t = self.tree.real_path(path)
            except LookupError:
                continue
            tn = self.tree.lookup(t)
            if tn is None or tn.kind != FILE or t in self.kept:
                continue
            if (
                not (tn.mode & 0o111 or t.startswith(INIT_PREFIXES) or _is_doc(t))
                and elf._head(tn, 4) != elf.ELF_MAGIC
            ):
                self.keep(t, "symlink-target", f"target of the kept symlink /{path}")

    # -- the new tree and the report -------------------------------------------------------------
    def result(self, mode: str) -> tuple[Tree, Report]:
        tree = self.tree
        paths: dict[str, tuple[str, str, str]] = {}
        kept: dict[str, list[int]] = {}
        dropped: dict[str, list[int]] = {}
        keep_set: set[str] = set()
        symlinks: list[tuple[str, Inode]] = []
        for path, node in tree.walk():
            if not path:
                continue
            size = node.size if node.kind == FILE else 0
            if node.kind == DIR:
                keep_set.add(path)
                continue
            if node.kind == SYMLINK:
                symlinks.append((path, node))
                continue
            if path in self.kept:
                r, d = self.kept[path]
            elif node.kind != FILE:
                r, d = "device", "device nodes and fifos are always kept"
            else:
                r, d = self.dropped_why.get(path, ("unreferenced", "no rule reached it"))
                paths["/" + path] = ("dropped", r, d)
                dropped.setdefault(r, [0, 0])
                dropped[r][0] += 1
                dropped[r][1] += size
                continue
            keep_set.add(path)
            paths["/" + path] = ("kept", r, d)
            kept.setdefault(r, [0, 0])
            kept[r][0] += 1
            kept[r][1] += size
        for path, _node in symlinks:  # kept unless they point at a file that was dropped
            try:
                t = tree.real_path(path)
            except LookupError:
                t = None
            tn = tree.lookup(t) if t is not None else None
            if tn is not None and tn.kind != DIR and t not in keep_set:
                r, d, status = "dangling-after-minimize", f"points at dropped /{t}", "dropped"
            else:
                r, d = self.kept.get(path, ("symlink", "symlinks are kept unless their target was dropped"))
                status = "kept"
                keep_set.add(path)
            paths["/" + path] = (status, r, d)
            tgt = kept if status == "kept" else dropped
            tgt.setdefault(r, [0, 0])
            tgt[r][0] += 1
        new = Tree(_copy_dirs(tree.root, keep_set))
        report = Report(
            mode,
            {k: (v[0], v[1]) for k, v in kept.items()},
            {k: (v[0], v[1]) for k, v in dropped.items()},
            paths,
            tuple(dict.fromkeys(self.notes)),
            self.recipe.name if self.recipe else None,
        )
        return new, report


def _copy_dirs(root: Inode, keep: set[str]) -> Inode:
    """New directory inodes for `root` and every directory below it, holding only the paths in `keep`;
    other inodes are shared. Iterative: any depth."""

    def copy(node: Inode) -> Inode:
        return Inode(
            DIR,
            node.mode,
            node.uid,
            node.gid,
            node.mtime,
            xattrs=dict(node.xattrs) if node.xattrs else None,
            children={},
        )

    new_root = copy(root)
    stack = [("", root, new_root)]
    while stack:
        path, node, new = stack.pop()
        assert node.children is not None and new.children is not None
        prefix = path + "/" if path else ""
        for name, child in node.children.items():
            p = prefix + name
            if p not in keep:
                continue
            if child.kind == DIR:
                new.children[name] = copy(child)
                stack.append((p, child, new.children[name]))
            else:
                new.children[name] = child
    return new_root


def _walk_from(node: Inode, base: str) -> Iterable[tuple[str, Inode]]:
    """(path, inode) of everything below a directory (not following symlinks), depth first."""
    stack = [(base, node)]
    while stack:
        path, n = stack.pop()
        if n.children:
            for name, c in n.children.items():
                p = f"{path}/{name}" if path else name
                yield p, c
                if c.kind == DIR:
                    stack.append((p, c))
