"""The minimize report and its reason vocabulary.

`Report` is what `minimize()` returns next to the new tree: every path of the source image with the rule
("reason") that kept or dropped it, and the totals per reason; `Report.to_json()` is the manifest.json
"minimize" section. `REASONS` / `reason_text()` are the one place a reason name is explained in words
(`xbuild explain` reads them from here). A reason is a plain name ("elf-closure") or KIND:NAME for the
reasons that name a package or an interpreter ("package:nginx", "interpreter:python3.11").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REASONS = {
    "entrypoint": "the image's Entrypoint/Cmd argv[0], resolved on PATH inside the image",
    "cmd": "Cmd[0], which the entrypoint script is expected to exec",
    "argv": "a file or directory named by an argument of the entrypoint",
    "healthcheck": "the image's HEALTHCHECK probe (its program, or its shell and what the text runs)",
    "workdir": "in the image's WorkingDir (the application's own files)",
    "elf-closure": "needed to load a kept program (PT_INTERP / DT_NEEDED, searched like ld.so)",
    "shebang": "the interpreter of a kept script",
    "script": "named by shell code: a kept script, or the image's command line (`sh -c TEXT`, a program "
    "run by tini/gosu/env/...): a command it runs or looks up, a file it sources or mentions",
    "glibc-nss": "glibc loads it for a service named in /etc/nsswitch.conf",
    "glibc-gconv": "glibc's iconv modules, kept because a kept program imports iconv_open",
    "locale": "the locale named by LANG / LC_* in the image's Env",
    "etc": "everything under /etc is kept",
    "etc-link": "the target of a symlink under /etc",
    "symlink": "symlinks are kept unless they point at a dropped file",
    "device": "device nodes and fifos are always kept",
    "recipe": "the recipe's keep list",
    "trace": "opened by the entrypoint in the trace probe",
    "none": "minimize was off (--minimize none)",
    "unreferenced": "no rule reached it (not an entrypoint dependency, not in /etc, "
    "not in an owning package)",
    "doc": "documentation, man pages and locales are never kept",
    "dev": "headers and static libraries are never kept",
    "init-system": "service-manager files (systemd units...): the guest's init runs the entrypoint directly",
    "gconv-unused": "glibc's iconv modules, dropped because no kept program imports iconv_open",
    "interpreter-cache": "bytecode caches; the interpreter rebuilds them",
    "interpreter-tests": "an interpreter's test suite, IDE or GUI toolkit",
    "dangling-after-minimize": "a symlink whose target was dropped (no kept symlink dangles)",
    "path-string": "named by its absolute path as a string in a kept program, library or script (a data "
    "file it opens by path, e.g. Debian libnode's externalized builtins in /usr/share/nodejs)",
    "symlink-target": "the data file a kept symlink points at (no kept symlink dangles)",
    "glibc-libgcc": "glibc dlopen()s libgcc_s.so.1 to unwind threads: a kept object imports pthread_cancel "
    "or pthread_exit (without it: 'libgcc_s.so.1 must be installed', abort)",
    "glibc-sh": "/bin/sh: a kept object calls popen(), system() or wordexp(), which glibc runs through "
    "/bin/sh -c (without it popen fails with 'Cannot allocate memory')",
    "popen-command": "a command the image's main program runs through popen()/system(), named by a command "
    "line string in it (PostgreSQL's `locale -a`, which imports the system's collations)",
    "optional-plugin": "a plugin its program loads only when present and runs without (PostgreSQL's LLVM "
    "JIT provider llvmjit.so and its bitcode: without them the server disables JIT); keep it with a recipe",
    "node-modules": "a node_modules directory Node.js searches from a kept entry script (walking up to /), "
    "or a NODE_PATH directory; native .node addons come with their ELF closure",
    "node-package": 'the package of a kept Node.js entry script: its package.json ("type", "main", '
    '"exports") and its own modules',
    "jvm-modules": "the JVM's class library image $JAVA_HOME/lib/modules (libjvm opens it by path)",
    "jvm-cfg": "$JAVA_HOME/lib/jvm.cfg: the java launcher reads it to choose the VM variant",
    "jvm-libjvm": "the VM variant jvm.cfg marks KNOWN: the launcher dlopen()s lib/VARIANT/libjvm.so",
    "jvm-cds": "the JVM's default class-data-sharing archive (lib/VARIANT/classes.jsa): faster start-up",
    "jvm-security": "the JVM's security configuration (java.security, policies, blocked certificates)",
    "jvm-cacerts": "the JVM's default TLS trust store ($JAVA_HOME/lib/security/cacerts)",
    "jvm-tzdb": "the time-zone rules java.time reads ($JAVA_HOME/lib/tzdb.dat)",
    "jvm-conf": "configuration the Java class library reads from $JAVA_HOME/conf",
    "jvm-helper": "jspawnhelper: the JVM starts child processes through it",
    "jvm-native": "a native library of the JDK modules in $JAVA_HOME/lib (System.loadLibrary by name)",
    "jvm-lib": "another file of $JAVA_HOME/lib the class library reads by name (fonts, properties)",
    "jvm-unused": "a JDK file no running program reads (sources, javac's ct.sym, the CDS archive for "
    "uncompressed oops)",
}
# KIND of the reasons KIND:NAME -> their text, NAME filled in
NAMED_REASONS = {
    "package": "a data/config file of the package {name}, which owns a kept file",
    "package-command": "a command of the package {name} that nothing runs (commands enter only "
    "when something names them)",
    "package-library": "a library or plugin of the package {name} that no kept program loads",
    "interpreter": "the standard library / module directories of the interpreter {name} (it loads them by "
    "name at run time)",
}


def reason_text(reason: str) -> str:
    """What a reason of the report means, in words; an unknown reason (a newer xbuild's) is its own text."""
    if reason in REASONS:
        return REASONS[reason]
    kind, _, name = reason.partition(":")
    return NAMED_REASONS[kind].format(name=name) if kind in NAMED_REASONS else reason


@dataclass(frozen=True)
class Report:
    """What minimize kept and dropped. `paths` maps '/path' -> (status, reason, detail) where status
    is 'kept' or 'dropped'; `kept`/`dropped` map reason -> (files, bytes) (regular-file bytes, a
    hardlinked file counted under each of its names)."""

    mode: str
    kept: dict[str, tuple[int, int]]
    dropped: dict[str, tuple[int, int]]
    paths: dict[str, tuple[str, str, str]] = field(repr=False)
    notes: tuple[str, ...] = ()
    recipe: str | None = None

    @property
    def kept_files(self) -> int:
        return sum(n for n, _ in self.kept.values())

    @property
    def kept_bytes(self) -> int:
        return sum(b for _, b in self.kept.values())

    @property
    def dropped_files(self) -> int:
        return sum(n for n, _ in self.dropped.values())

    @property
    def dropped_bytes(self) -> int:
        return sum(b for _, b in self.dropped.values())

    def to_json(self) -> dict[str, Any]:
        """The manifest.json "minimize" section (explain.py reads it back)."""
        return {
            "mode": self.mode,
            "recipe": self.recipe,
            "kept": {
                "files": self.kept_files,
                "bytes": self.kept_bytes,
                "by_reason": {r: {"files": n, "bytes": b} for r, (n, b) in sorted(self.kept.items())},
            },
            "dropped": {
                "files": self.dropped_files,
                "bytes": self.dropped_bytes,
                "by_reason": {r: {"files": n, "bytes": b} for r, (n, b) in sorted(self.dropped.items())},
            },
            "notes": list(self.notes),
            "paths": {p: list(v) for p, v in sorted(self.paths.items())},
        }

    def summary(self, top: int = 12) -> str:
        """A human summary: totals, then the biggest reasons each way."""

        def mb(b: int) -> str:
            return f"{b / 1e6:.2f} MB" if b >= 100_000 else f"{b / 1e3:.1f} KB"

        lines = [
            f"minimize ({self.mode}{', recipe ' + self.recipe if self.recipe else ''}): "
            f"kept {self.kept_files} files, {mb(self.kept_bytes)}; "
            f"dropped {self.dropped_files} files, {mb(self.dropped_bytes)}"
        ]
        for title, d in (("kept", self.kept), ("dropped", self.dropped)):
            items = sorted(d.items(), key=lambda kv: (-kv[1][1], kv[0]))
            for r, (n, b) in items[:top]:
                lines.append(f"  {title:7} {mb(b):>10} {n:6} files  {r}")

            if len(items) > top:
                rest = items[top:]
                lines.append(
                    f"  {title:7} {mb(sum(b for _, (_, b) in rest)):>10} "
                    f"{sum(n for _, (n, _) in rest):6} files  ({len(rest)} more reasons)"
                )
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
