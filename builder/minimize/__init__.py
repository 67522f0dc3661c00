"""Minimize: keep what the entrypoint needs, drop the rest, and account for every byte.

`minimize(tree, config, recipe, mode)` returns a new Tree (directories are new inodes, every kept
file/symlink/device inode is shared with the input, so hardlinks stay shared; the input is never
mutated) and a Report. Mode `none` keeps everything; `auto` applies these rules, each path taking the
first reason that reaches it:

  entrypoint / cmd  argv[0] of Entrypoint+Cmd resolved like runc (Env PATH, WorkingDir, symlinks inside
                    the tree); a missing one is a MinimizeError. When an Entrypoint is set, Cmd[0] is
                    resolved too (entrypoint scripts usually end in `exec "$@"`).
  argv / workdir    other argv words naming a file (kept, and followed if it is a program or script) or
                    a directory (kept with everything below), and everything below WorkingDir: the
                    application's own files. System directories (/, /usr, /etc, /var, /lib...) are never
                    taken whole this way.
  elf-closure       PT_INTERP + DT_NEEDED, transitively, searched like ld.so (see elf.py). Missing
                    libraries of the entrypoint's closure are a MinimizeError; of anything reached only
                    heuristically (script commands, plugins) they are a note in the report.
  shebang / script  `#!` interpreters (`/usr/bin/env NAME` resolved on PATH); for shell scripts (and
                    the image's own command line, `sh -c TEXT`, a CMD-SHELL HEALTHCHECK) every command
                    shell.scan finds they can run, with the construct as the detail ("`exec gosu` in
                    /docker-entrypoint.sh": after exec/env/gosu/setpriv/tini/…, in $(…), sh -c, eval,
                    find -exec, xargs, functions), names they look up (`command -v X`), the files they
                    source or run with a shell (read as shell code too), and absolute paths they mention:
                    a file is kept (and followed if executable), a directory such as /docker-entrypoint.d/
                    contributes its executable files and *.sh. Commands named by an expansion are a note.
                    Only the first MiB of a script is read (a script with a payload is not parsed whole).
  glibc-nss         libnss_<service> for each service named in /etc/nsswitch.conf (glibc dlopen()s them).
  glibc-gconv       the gconv modules, only when a kept object imports iconv_open (else "gconv-unused").
  glibc-libgcc      libgcc_s.so.1 when a kept object imports pthread_cancel/pthread_exit (glibc dlopen()s it).
  glibc-sh          /bin/sh when a kept object imports popen/system/wordexp (glibc runs /bin/sh -c; without
                    it popen fails with ENOMEM: initdb's "popen failure: Cannot allocate memory").
  locale            /usr/lib/locale/<name> for a LANG / LC_* locale set in Env (the locale archive when it
                    has no directory of its own).
  interpreter:X     python: its stdlib and site/dist-packages (minus tests, idlelib, tkinter, ensurepip,
                    __pycache__; a venv's pyvenv.cfg and site-packages), with the ELF closure of their
                    extension modules; perl, ruby, php: their module directories.
  node-modules / node-package
                    when node runs: from each entry script (a kept .js/.mjs/.cjs or node-shebang file the
                    command line or a script names, an argv directory, the WorkingDir) the package root
                    (nearest package.json, kept whole unless a bin directory; its "main"/"exports"), every
                    node_modules directory up to / (native .node addons with their closure, linked workspace
                    packages followed) and NODE_PATH.
  jvm-*             when $JAVA_HOME/bin/java runs (with or without a package database): lib/modules
                    (jvm-modules), lib/jvm.cfg (jvm-cfg), lib/VARIANT/libjvm.so of each KNOWN variant
                    (jvm-libjvm, dlopen()ed) and its classes.jsa (jvm-cds), lib/security + conf/security
                    (jvm-security), the cacerts trust store (jvm-cacerts), lib/tzdb.dat (jvm-tzdb), conf/
                    (jvm-conf), jspawnhelper (jvm-helper), lib/*.so (jvm-native), the rest of lib/ (jvm-lib);
                    dropped as jvm-unused: src.zip, ct.sym, classes_nocoops.jsa, variants not KNOWN.
  optional-plugin   (dropped) plugins a program loads only when present and runs without: PostgreSQL's
                    LLVM JIT (llvmjit.so, its bitcode; with libLLVM and libz3 ~160 MB). A recipe keeps them.
  package:P         Tinyx's idea, narrowed to what is not code: for every dpkg/apk package P owning a
                    kept file, P's other files, EXCEPT docs/man/info/locales ("doc"), headers and static
                    libs ("dev"), systemd units and the like ("init-system"), files in bin/sbin dirs
                    ("package-command": a command enters only when something names it), ELF files
                    ("package-library": libraries enter only through a DT_NEEDED; only packages owning an
                    executed program keep the plugin ELFs in their library subdirectories and libexec),
                    and gconv (rule above). The package of argv[0]/Cmd[0] also brings the packages it
                    Depends on that come from the same source name (one level:
                    nginx -> nginx-common, redis-server -> redis-tools; not iproute2 or libc6's data).
                    This is what keeps the nginx look-alike near its floor: libc6's gconv (8 MB),
                    coreutils' other commands etc. never ride along.
  path-string       a data file (not ELF, not a script, not executable) named by its absolute path as a
                    string in a loaded ELF object or executed script (Debian libnode's externalized builtins).
  symlink-target    the data file a kept symlink points at: no kept symlink dangles.
  etc / etc-link    all of /etc; the target of a symlink in /etc (e.g. /etc/localtime) except
                    /etc/alternatives (commands) and /etc/ssl/certs (hash links duplicating the bundle).
  directory / symlink / device
                    every directory (mode, owner kept); a symlink unless it points at a dropped file
                    ("dangling-after-minimize"); device nodes and fifos.
  recipe            the recipe's keep paths (with everything below) and globs, plus their ELF closure.
  trace             (mode trace only) on top of auto: every path the entrypoint's processes touched
                    while it ran for [trace] seconds in a sandbox on the build host (probe.py:
                    bubblewrap with user/pid/net/mount namespaces, a staged copy of the whole tree,
                    strace -f), with the recipe's network smoke test exercising it meanwhile
                    (SlimToolkit's idea).
Anything else is dropped as "unreferenced".

The package, one job a module: rules.py (the rule engine and the new tree), shell.py (what a shell script
runs, sources and names), packages.py (dpkg/apk databases), report.py (the Report and the reason
vocabulary `xbuild explain` uses), probe.py (the sandboxed run of the entrypoint for trace), smoke.py (the
smoke test the probe runs inside the sandbox's network namespace).
"""

from __future__ import annotations

from ..errors import MinimizeError
from ..image import ImageConfig
from ..options import MinimizeMode, choices
from ..recipes import Recipe
from ..tree import DIR, Tree
from . import probe
from .report import Report
from .rules import Minimizer


def minimize(
    tree: Tree,
    config: ImageConfig,
    recipe: Recipe | None = None,
    mode: str = MinimizeMode.AUTO,
    arch: str | None = None,
) -> tuple[Tree, Report]:
    """Keep what `config`'s entrypoint needs (see the module doc); never mutates `tree`. With `arch` (the
    image's OCI architecture), an ELF program the entrypoint surely runs (argv[0], Cmd[0], their `#!`
    interpreters, in every mode) that is for another machine is a MinimizeError."""
    if mode not in choices(MinimizeMode):
        raise MinimizeError(
            f"unknown minimize mode {mode!r} (choose from {', '.join(choices(MinimizeMode))})"
        )
    m = Minimizer(tree, config, recipe, arch)
    if mode == MinimizeMode.NONE:
        c = config
        argv = list(c.entrypoint) + list(c.cmd) if c.entrypoint else list(c.cmd)
        if argv and (first := m.command(argv[0])) is not None:
            m.check_machine(first, "the entrypoint's")
        for path, node in tree.walk():
            if path and node.kind != DIR:
                m.mark(path, "none", "minimize disabled")
        return m.result(mode)
    if mode == MinimizeMode.TRACE:
        probe.check_probe_host(trace=True)
    m.run()
    if mode == MinimizeMode.TRACE:
        seconds = recipe.trace_seconds if recipe else 5.0
        result = probe.probe(tree, config, recipe, seconds=seconds, trace=True)
        for p in sorted(result.opened):
            hit = tree.lookup(p, follow=False)
            if hit is not None and hit.kind != DIR:
                m.keep(p, "trace", f"opened by the entrypoint in the {seconds:g}s trace probe")
                m.need(p, "trace", "opened in the trace probe")
        m.drain()
        m.notes.append(
            f"trace probe: ran {seconds:g}s, {len(result.opened)} paths seen"
            + (f"; smoke: {result.smoke[1]}" if result.smoke else "")
            + (
                "; its trace log reached the size cap, later accesses were not seen"
                if result.log_full
                else ""
            )
        )
    return m.result(mode)
