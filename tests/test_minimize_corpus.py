"""The rules the compatibility corpus taught `--minimize auto` (issue 13): every file the corpus showed was
dropped but needed is a test here, on small host-built trees (fast) and on the corpus images (slow).

- path-string: data files a kept program names by absolute path (Debian libnode's externalized builtins)
- symlink-target / dangling-after-minimize: no kept symlink dangles
- locale: LANG naming a locale of the locale archive keeps the archive
- glibc-libgcc: pthread_cancel/pthread_exit users get libgcc_s.so.1 (glibc dlopen()s it)
- interpreter:perl/ruby/php: module directories loaded by name at run time
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.flatten import flatten
from builder.image import ImageConfig
from builder.minimize import minimize
from builder.minimize.probe import probe
from builder.recipes import Recipe, Smoke
from builder.reference import parse
from builder.source import load
from builder.tree import FILE, SYMLINK, Tree
from tests.fixtures.corpus import APPS, layout_ref
from tests.fixtures.minimize_images import add_file, add_host_file, add_link, host_tree
from tests.test_minimize import LIBDIR, PATH_ENV, base_tree, entry, status


def compiled(tmp_path: Path, source: str, *flags: str) -> Path:
    """A dynamically linked C program built with the host's gcc."""
    cc = shutil.which("gcc")
    if not cc:
        pytest.skip("no gcc")
    (tmp_path / "prog.c").write_text(source)
    subprocess.run([cc, "-O1", "-o", str(tmp_path / "prog"), str(tmp_path / "prog.c"), *flags], check=True)
    return tmp_path / "prog"


def test_path_string_keeps_data_files_a_program_opens_by_path(tmp_path: Path) -> None:
    prog = compiled(
        tmp_path,
        "#include <stdio.h>\nint main(void) {\n"
        '  FILE *f = fopen("/usr/share/corpus/builtin.js", "r");\n'
        '  puts("/usr/bin/sort"); puts("/usr/share/corpus"); puts("/nonexistent/x");\n'
        "  return f == NULL;\n}\n",
    )
    t = base_tree()
    add_host_file(t, "usr/bin/prog", str(prog), 0o755)
    add_file(t, "usr/share/corpus/builtin.js", b"module.exports = 1;\n")
    add_file(t, "usr/share/corpus/other.js", b"unused\n")
    new, rep = entry(t, "prog")
    assert status(rep, "/usr/share/corpus/builtin.js") == ("kept", "path-string")
    assert "/usr/bin/prog" in rep.paths["/usr/share/corpus/builtin.js"][2]
    assert status(rep, "/usr/share/corpus/other.js") == ("dropped", "unreferenced")  # a directory: not whole
    assert rep.paths["/usr/bin/sort"][0] == "dropped"  # a program enters only when something runs it
    assert new.lookup("usr/share/corpus/builtin.js") is not None


def test_pthread_exit_keeps_libgcc_s(tmp_path: Path) -> None:
    """glibc dlopen()s libgcc_s.so.1 for pthread_exit/pthread_cancel; without it the program aborts."""
    prog = compiled(tmp_path, "#include <pthread.h>\nint main(void) { pthread_exit(0); }\n", "-pthread")
    libgcc = Path(LIBDIR) / "libgcc_s.so.1"
    if not libgcc.exists():
        pytest.skip("no host libgcc_s.so.1")
    t = base_tree()
    add_host_file(t, "usr/bin/prog", str(prog), 0o755)
    host_tree([str(libgcc)], t)
    _, rep = entry(t, "prog")
    assert status(rep, f"{LIBDIR}/libgcc_s.so.1") == ("kept", "glibc-libgcc")
    _, rep = entry(t, "ls")
    assert rep.paths[f"{LIBDIR}/libgcc_s.so.1"][0] == "dropped"


def _dangling(new: Tree, source: Tree) -> list[str]:
    """Symlinks of the minimized tree whose target the source tree has but the minimized one lacks
    (links that already dangled in the image, such as /dev/fd or excluded man pages, are not counted)."""
    bad = []
    for path, node in new.walk():
        if node.kind == SYMLINK:
            try:
                real = new.real_path(path)
            except LookupError:
                continue
            if new.lookup(real) is None and source.lookup(real) is not None:
                bad.append(path)
    return bad


def test_no_kept_symlink_dangles() -> None:
    t = base_tree()
    add_file(t, "app/run.sh", b"#!/bin/sh\nexec sort /etc/passwd\n", 0o755)
    add_link(t, "app/conf.yml", "/usr/share/corpus/default.yml")  # a sample linked into place
    add_file(t, "usr/share/corpus/default.yml", b"a: 1\n")
    add_link(t, "etc/alternatives/pager", "/usr/bin/cat")  # a program nothing runs
    add_link(t, "etc/systemd/system/multi-user.target.wants/x.service", "/usr/lib/systemd/system/x.service")
    add_file(t, "usr/lib/systemd/system/x.service", b"[Service]\n")
    new, rep = entry(t, "/app/run.sh", workdir="/app")
    assert status(rep, "/usr/share/corpus/default.yml") == ("kept", "symlink-target")
    assert status(rep, "/app/conf.yml") == ("kept", "workdir")
    assert status(rep, "/etc/alternatives/pager") == ("dropped", "dangling-after-minimize")
    assert status(rep, "/etc/systemd/system/multi-user.target.wants/x.service") == (
        "dropped",
        "dangling-after-minimize",
    )
    assert _dangling(new, t) == []


def test_locale_archive_follows_env() -> None:
    t = base_tree()
    add_file(t, "usr/lib/locale/locale-archive", b"\x09\x01\x02\xde" + b"\0" * 100)
    add_file(t, "usr/lib/locale/C.utf8/LC_CTYPE", b"ctype")
    _, rep = entry(t, "ls", env=(*PATH_ENV, "LANG=en_US.utf8"))
    assert status(rep, "/usr/lib/locale/locale-archive") == ("kept", "locale")
    _, rep = entry(t, "ls", env=(*PATH_ENV, "LANG=C.UTF-8"))  # a directory of its own
    assert status(rep, "/usr/lib/locale/C.utf8/LC_CTYPE") == ("kept", "locale")
    assert rep.paths["/usr/lib/locale/locale-archive"][0] == "dropped"
    _, rep = entry(t, "ls")
    assert rep.paths["/usr/lib/locale/locale-archive"][0] == "dropped"


def test_data_directory_named_by_the_entrypoint_script_is_kept() -> None:
    """haproxy's entrypoint starts its upstream with `busybox httpd -h /srv/upstream`: the pages are data."""
    t = base_tree()
    add_file(t, "entry.sh", b"#!/bin/sh\nls -l /srv/upstream\nexec sort /etc/passwd\n", 0o755)
    add_file(t, "srv/upstream/index.html", b"hello from the upstream\n")
    add_file(t, "hooks.d/10-a.sh", b"#!/bin/sh\necho hi\n", 0o755)
    add_file(t, "hooks.d/README", b"not a script")
    add_file(t, "hooks.sh", b'#!/bin/sh\nfor f in $(find /hooks.d/ -type f); do "$f"; done\n', 0o755)
    _, rep = entry(t, "/entry.sh")
    assert status(rep, "/srv/upstream/index.html") == ("kept", "script")
    _, rep = entry(t, "/hooks.sh")
    assert status(rep, "/hooks.d/10-a.sh") == ("kept", "script")
    assert status(rep, "/hooks.d/README") == ("dropped", "unreferenced")  # a hook directory: scripts only


def needs_libm(tmp_path: Path, name: str) -> Path:
    """A shared object built with the host's gcc whose only DT_NEEDED beyond libc is libm.so.6."""
    cc = shutil.which("gcc")
    if not cc:
        pytest.skip("no gcc")
    (tmp_path / f"{name}.c").write_text("#include <math.h>\ndouble f(double x) { return cbrt(x); }\n")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(tmp_path / name), str(tmp_path / f"{name}.c"), "-lm"], check=True
    )
    return tmp_path / name


def test_path_string_never_takes_a_program(tmp_path: Path) -> None:
    """postgres names /usr/bin/prove (its TAP test driver, a Perl script): taken as data it brought Perl and
    its whole @INC (50 MB). A program enters when something runs it, not because its name is known."""
    prog = compiled(
        tmp_path,
        "#include <stdio.h>\nint main(void) {\n"
        '  puts("/usr/bin/prove"); puts("/usr/local/bin/tool"); puts("/usr/share/corpus/data.txt");\n'
        "  return 0;\n}\n",
    )
    t = base_tree()
    add_host_file(t, "usr/bin/prog", str(prog), 0o755)
    add_file(t, "usr/bin/prove", b"#!/usr/bin/perl\nprint 1;\n", 0o644)  # a script, even without x bits
    add_host_file(t, "usr/bin/perl", "/usr/bin/sort", 0o755)
    add_host_file(t, "usr/local/bin/tool", "/usr/bin/cat", 0o755)
    add_file(t, "usr/share/corpus/data.txt", b"data\n")
    _, rep = entry(t, "prog")
    assert status(rep, "/usr/share/corpus/data.txt") == ("kept", "path-string")
    assert status(rep, "/usr/bin/prove") == ("dropped", "unreferenced")
    assert status(rep, "/usr/bin/perl") == ("dropped", "unreferenced")
    assert status(rep, "/usr/local/bin/tool") == ("dropped", "unreferenced")


def test_popen_keeps_bin_sh(tmp_path: Path) -> None:
    """glibc's popen()/system() run /bin/sh -c: initdb's `postgres -V` died with "popen failure: Cannot
    allocate memory" (glibc reports any failed spawn as ENOMEM) when auto dropped /bin/sh."""
    prog = compiled(
        tmp_path,
        "#include <stdio.h>\n#include <stdlib.h>\nint main(void) {\n"
        '  FILE *p = popen("sort -r", "w"); puts("cat -v"); system("true");\n'
        "  return p ? pclose(p) : 1;\n}\n",
    )
    t = base_tree()
    add_host_file(t, "usr/bin/prog", str(prog), 0o755)
    _, rep = entry(t, "prog")
    assert status(rep, "/usr/bin/dash") == ("kept", "glibc-sh")
    assert status(rep, "/usr/bin/sh") == ("kept", "glibc-sh")
    assert "/usr/bin/prog imports popen/system" in rep.paths["/usr/bin/dash"][2]
    # the command line it popen()s (PostgreSQL's `locale -a`: "sh: 1: locale: not found", no collations)
    assert status(rep, "/usr/bin/sort") == ("kept", "popen-command")
    assert "`sort -r` in /usr/bin/prog" in rep.paths["/usr/bin/sort"][2]
    assert status(rep, "/usr/bin/cat") == ("kept", "popen-command")  # any such string: it cannot tell
    assert rep.paths["/usr/bin/ls"][0] == "dropped"
    # only the main program's strings: busybox run on the side names its init's `umount -a -r`
    add_file(t, "run.sh", b"#!/bin/sh\nprog\nexec ls\n", 0o755)
    _, rep = entry(t, "/run.sh")
    assert status(rep, "/usr/bin/prog") == ("kept", "script")
    assert rep.paths["/usr/bin/sort"][0] == "dropped"
    _, rep = entry(t, "ls")
    assert rep.paths["/usr/bin/dash"][0] == "dropped"


def _dpkg(t: Tree, lists: dict[str, list[str]]) -> None:
    for pkg, files in lists.items():
        add_file(t, f"var/lib/dpkg/info/{pkg}.list", "\n".join(files).encode() + b"\n")
    add_file(t, "var/lib/dpkg/status", b"".join(f"Package: {p}\n\n".encode() for p in lists))


def test_postgres_jit_provider_is_optional(tmp_path: Path) -> None:
    """PostgreSQL checks that llvmjit.so exists and disables JIT without it: the provider (libLLVM + libz3,
    135 MB) and its bitcode (24 MB) are dropped, the server's real plugins (plpgsql) kept; a recipe keeps
    the JIT."""
    t = base_tree()
    pg = "usr/lib/postgresql/15"
    add_host_file(t, f"{pg}/bin/postgres", "/usr/bin/ls")
    add_host_file(t, f"{pg}/lib/plpgsql.so", f"{LIBDIR}/libnss_dns.so.2")
    add_host_file(t, f"{pg}/lib/llvmjit.so", str(needs_libm(tmp_path, "llvmjit.so")))
    add_file(t, f"{pg}/lib/llvmjit_types.bc", b"BC\xc0\xde")
    add_file(t, f"{pg}/lib/bitcode/postgres/parser/gram.bc", b"BC\xc0\xde")
    add_file(t, "usr/share/postgresql/15/postgres.bki", b"create pg_proc\n")
    files = [f"/{pg}/bin/postgres", f"/{pg}/lib/plpgsql.so", f"/{pg}/lib/llvmjit.so"]
    files += [f"/{pg}/lib/llvmjit_types.bc", f"/{pg}/lib/bitcode/postgres/parser/gram.bc"]
    _dpkg(t, {"postgresql-15": [*files, "/usr/share/postgresql/15/postgres.bki"]})
    env = (f"PATH=/{pg}/bin:/usr/bin:/bin",)
    _, rep = entry(t, "postgres", env=env)
    assert status(rep, f"/{pg}/lib/plpgsql.so") == ("kept", "package:postgresql-15")
    assert status(rep, "/usr/share/postgresql/15/postgres.bki") == ("kept", "package:postgresql-15")
    for p in ("lib/llvmjit.so", "lib/llvmjit_types.bc", "lib/bitcode/postgres/parser/gram.bc"):
        assert status(rep, f"/{pg}/{p}") == ("dropped", "optional-plugin")
    assert rep.paths[f"{LIBDIR}/libm.so.6"][0] == "dropped"  # llvmjit's closure did not ride along
    _, rep = entry(t, "postgres", env=env, recipe=Recipe("pg-jit", keep_paths=(f"/{pg}/lib/llvmjit.so",)))
    assert status(rep, f"/{pg}/lib/llvmjit.so") == ("kept", "recipe")
    assert rep.paths[f"{LIBDIR}/libm.so.6"][:2] == ("kept", "elf-closure")


def test_jvm_home_without_a_package_database(tmp_path: Path) -> None:
    """A JDK home that no package owns (eclipse-temurin's /opt/java/openjdk): what the VM opens by path
    relative to its home is kept, each file with its own reason; the variant jvm.cfg ignores, sources,
    ct.sym and the no-compressed-oops CDS archive are not."""
    t = base_tree()
    home = "opt/java/openjdk"
    add_host_file(t, f"{home}/bin/java", "/usr/bin/ls")
    add_host_file(t, f"{home}/bin/keytool", "/usr/bin/cat")
    add_file(t, f"{home}/lib/modules", b"JIMAGE")
    add_file(t, f"{home}/lib/jvm.cfg", b"# comment\n-server KNOWN\n-client IGNORE\n")
    add_host_file(t, f"{home}/lib/server/libjvm.so", str(needs_libm(tmp_path, "libjvm.so")))  # dlopen()ed
    add_file(t, f"{home}/lib/server/classes.jsa", b"CDS")
    add_file(t, f"{home}/lib/server/classes_nocoops.jsa", b"CDS")
    add_host_file(t, f"{home}/lib/client/libjvm.so", f"{LIBDIR}/libnss_dns.so.2")
    add_file(t, f"{home}/lib/security/cacerts", b"JKS")
    add_file(t, f"{home}/lib/security/default.policy", b"grant {};\n")
    add_file(t, f"{home}/conf/security/java.security", b"security.provider.1=SUN\n")
    add_file(t, f"{home}/conf/net.properties", b"java.net.useSystemProxies=false\n")
    add_file(t, f"{home}/lib/tzdb.dat", b"TZDB")
    add_host_file(t, f"{home}/lib/libnet.so", f"{LIBDIR}/libnss_dns.so.2")
    add_host_file(t, f"{home}/lib/jspawnhelper", "/usr/bin/cat")
    add_file(t, f"{home}/lib/psfontj2d.properties", b"x=y\n")
    add_file(t, f"{home}/lib/src.zip", b"PK")
    add_file(t, f"{home}/lib/ct.sym", b"PK")
    add_file(t, f"{home}/legal/java.base/LICENSE", b"GPL")
    add_file(t, "app/app.jar", b"PK")
    _, rep = entry(t, f"/{home}/bin/java", "-jar", "/app/app.jar")
    expect = {
        "lib/modules": "jvm-modules",
        "lib/jvm.cfg": "jvm-cfg",
        "lib/server/libjvm.so": "jvm-libjvm",
        "lib/server/classes.jsa": "jvm-cds",
        "lib/security/cacerts": "jvm-cacerts",
        "lib/security/default.policy": "jvm-security",
        "conf/security/java.security": "jvm-security",
        "conf/net.properties": "jvm-conf",
        "lib/tzdb.dat": "jvm-tzdb",
        "lib/libnet.so": "jvm-native",
        "lib/jspawnhelper": "jvm-helper",
        "lib/psfontj2d.properties": "jvm-lib",
    }
    for p, reason in expect.items():
        assert status(rep, f"/{home}/{p}") == ("kept", reason), p
    for p in ("lib/server/classes_nocoops.jsa", "lib/src.zip", "lib/ct.sym"):
        assert status(rep, f"/{home}/{p}") == ("dropped", "jvm-unused"), p
    for p in ("lib/client/libjvm.so", "bin/keytool", "legal/java.base/LICENSE"):
        assert rep.paths[f"/{home}/{p}"][0] == "dropped", p
    # libjvm's ELF closure (libm only through libjvm here)
    assert rep.paths[f"{LIBDIR}/libm.so.6"][:2] == ("kept", "elf-closure")
    assert "lib/server/libjvm.so" in rep.paths[f"{LIBDIR}/libm.so.6"][2]
    assert status(rep, "/app/app.jar") == ("kept", "argv")
    _, rep = entry(t, "/usr/bin/ls", f"/{home}/lib/modules")  # not run by java: no JVM rule
    assert rep.paths[f"/{home}/lib/tzdb.dat"][0] == "dropped"


def test_node_resolution_from_an_entry_script_outside_workdir(tmp_path: Path) -> None:
    """`node /srv/app/server.js` with WorkingDir /: the package root, node_modules on the way up to /,
    a linked workspace package, NODE_PATH, package.json main/exports and a native addon's closure."""
    addon = needs_libm(tmp_path, "cbrt.node")
    t = base_tree()
    add_host_file(t, "usr/bin/node", "/usr/bin/ls")
    add_file(t, "srv/app/server.js", b"require('express'); require('./lib/routes');\n")
    add_file(t, "srv/app/lib/routes.js", b"module.exports = {};\n")
    add_file(t, "srv/app/package.json", b'{"main": "server.js", "exports": {".": "./server.js"}}')
    add_file(t, "srv/app/node_modules/express/index.js", b"module.exports = 1;\n")
    add_file(t, "srv/app/node_modules/express/package.json", b'{"main": "index.js"}')
    add_host_file(t, "srv/app/node_modules/cbrt/build/Release/cbrt.node", str(addon), 0o644)
    add_link(t, "srv/app/node_modules/shared", "../../packages/shared")  # an npm workspace
    add_file(t, "srv/packages/shared/index.js", b"module.exports = 2;\n")
    add_file(t, "srv/packages/shared/package.json", b'{"name": "shared"}')
    add_file(t, "srv/node_modules/up/index.js", b"module.exports = 3;\n")  # found walking up
    add_file(t, "opt/nodelibs/extra/index.js", b"module.exports = 4;\n")
    add_file(t, "srv/other/unused.js", b"nothing requires this\n")
    # a package whose root is a bin directory: its package.json and "main" only, not the directory
    add_file(t, "usr/local/bin/cli.js", b"#!/usr/bin/env node\nrequire('./lib/x.js');\n", 0o755)
    add_file(t, "usr/local/bin/package.json", b'{"main": "lib/main.js"}')
    add_file(t, "usr/local/bin/lib/main.js", b"module.exports = 5;\n")
    add_file(t, "usr/local/bin/README.md", b"docs")
    env = (*PATH_ENV, "NODE_PATH=/opt/nodelibs")
    new, rep = entry(t, "node", "/srv/app/server.js", env=env)
    assert status(rep, "/srv/app/package.json") == ("kept", "node-package")
    assert status(rep, "/srv/app/lib/routes.js") == ("kept", "node-package")  # a relative require
    assert status(rep, "/srv/app/node_modules/express/index.js") == ("kept", "node-modules")
    assert status(rep, "/srv/node_modules/up/index.js") == ("kept", "node-modules")
    assert status(rep, "/srv/app/node_modules/shared") == ("kept", "node-modules")
    assert status(rep, "/srv/packages/shared/index.js") == ("kept", "node-package")
    assert status(rep, "/opt/nodelibs/extra/index.js") == ("kept", "node-modules")
    assert status(rep, "/srv/app/node_modules/cbrt/build/Release/cbrt.node") == ("kept", "node-modules")
    libm = rep.paths[f"{LIBDIR}/libm.so.6"]
    assert libm[:2] == ("kept", "elf-closure") and "cbrt.node" in libm[2]
    assert status(rep, "/srv/other/unused.js") == ("dropped", "unreferenced")
    assert _dangling(new, t) == []
    _, rep = entry(t, "node", "/usr/local/bin/cli.js", env=PATH_ENV)
    assert status(rep, "/usr/local/bin/package.json") == ("kept", "node-package")
    assert status(rep, "/usr/local/bin/lib/main.js") == ("kept", "node-package")
    assert status(rep, "/usr/local/bin/README.md") == ("dropped", "unreferenced")
    _, rep = entry(t, "/usr/bin/ls", "/srv/app/server.js")  # not run by node: no Node rule
    assert rep.paths["/srv/app/node_modules/express/index.js"][0] == "dropped"


# ------------------------------------------------------------------------------------------------ slow

# (app, path the app needs at run time that auto used to drop, the rule that keeps it now)
NEEDED = [
    ("node-express", "/usr/share/nodejs/cjs-module-lexer/lexer.js", "path-string"),  # else SIGABRT
    ("node-express", "/usr/share/nodejs/undici/undici-fetch.js", "path-string"),
    ("perl-tini", "/usr/share/perl5/HTTP/Daemon.pm", "interpreter:perl"),
    (
        "ruby-webrick",
        "/usr/share/rubygems-integration/all/gems/webrick-1.8.1/lib/webrick.rb",
        "interpreter:ruby3.1",
    ),
    ("php-cli", "/usr/lib/php/20220829/sockets.so", "interpreter:php8.2"),
    ("postgres", "/usr/lib/locale/locale-archive", "locale"),  # LANG=en_US.utf8
    ("haproxy", "/srv/upstream/index.html", "script"),  # httpd -h /srv/upstream
    ("py-asgi", "/opt/venv/lib/python3.11/site-packages/uvicorn/main.py", "interpreter:python3.11"),
    ("py-asgi", "/opt/venv/pyvenv.cfg", "interpreter:python3.11"),  # else no site-packages
    ("postgres", "/usr/bin/dash", "glibc-sh"),  # initdb: "popen failure: Cannot allocate memory"
    ("postgres", "/usr/bin/locale", "popen-command"),  # "sh: 1: locale: not found": no system collations
    ("postgres", "/usr/lib/postgresql/15/lib/plpgsql.so", "package:postgresql-15"),  # initdb loads it
    ("java-http", "/usr/lib/jvm/java-17-openjdk-amd64/lib/modules", "jvm-modules"),
    ("java-http", "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so", "jvm-libjvm"),
    ("java-http", "/usr/lib/jvm/java-17-openjdk-amd64/lib/tzdb.dat", "jvm-tzdb"),
    ("java-http", "/etc/ssl/certs/java/cacerts", "jvm-cacerts"),  # lib/security/cacerts links there
    ("java-http", "/etc/java-17-openjdk/jvm-amd64.cfg", "jvm-cfg"),  # lib/jvm.cfg links there
    ("java-http", "/etc/java-17-openjdk/security/java.security", "jvm-security"),
]


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("app,path,reason", NEEDED, ids=[f"{a}:{p.rsplit('/', 1)[-1]}" for a, p, _ in NEEDED])
def test_corpus_file_needed_at_run_time_is_kept(app: str, path: str, reason: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the corpus fixtures need root")
    image = load(parse(layout_ref(APPS[app])))
    source = flatten(image).tree
    new, rep = minimize(source, image.config)
    assert rep.paths[path][:2] == ("kept", reason), rep.paths[path]
    assert _dangling(new, source) == []
    node = new.lookup(path.lstrip("/"), follow=True)
    assert node is not None and node.kind == FILE


def _corpus_tree(app: str):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the corpus fixtures and the probe need root and bwrap")
    image = load(parse(layout_ref(APPS[app])))
    return image, flatten(image).tree


def _serves(new: Tree, config: ImageConfig, port: int, expect: str) -> None:
    """The minimized tree's entrypoint answers GET / with `expect` in the sandboxed probe (the host's
    kernel; builder/minimize/probe.py)."""
    recipe = Recipe("corpus", smoke=Smoke("http", port=port, expect=expect, timeout=90))
    r = probe(new, config, recipe, seconds=90)
    assert r.smoke is not None and r.smoke[0], (r.smoke, r.output[-3000:])


@pytest.mark.slow
@pytest.mark.corpus
def test_postgres_keeps_what_the_server_needs_only() -> None:
    """The 375 MB postgres image kept 307 MB under auto (Perl through a path string, LLVM through the JIT
    plugin) and did not unpack in 512 MB; now it keeps under 110 MB (README: its initrd, memory)."""
    image, source = _corpus_tree("postgres")
    _, rep = minimize(source, image.config)
    assert rep.kept_bytes < 110_000_000, rep.summary()
    assert rep.paths["/usr/bin/perl"][0] == "dropped"
    assert rep.paths["/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1"][0] == "dropped"
    assert rep.paths["/usr/lib/postgresql/15/lib/llvmjit.so"][:2] == ("dropped", "optional-plugin")


@pytest.mark.slow
@pytest.mark.corpus
def test_jdk_without_package_database_serves() -> None:
    """java-http with its dpkg database removed (a JDK no package owns, as in eclipse-temurin): the JVM
    rules alone keep what the VM opens by path, and the minimized tree serves."""
    image, source = _corpus_tree("java-http")
    source.remove("var/lib/dpkg")
    new, rep = minimize(source, image.config)
    home = "/usr/lib/jvm/java-17-openjdk-amd64"
    assert rep.paths[f"{home}/lib/modules"][:2] == ("kept", "jvm-modules")
    assert rep.paths[f"{home}/lib/server/libjvm.so"][:2] == ("kept", "jvm-libjvm")
    assert rep.paths[f"{home}/lib/server/classes_nocoops.jsa"][:2] == ("dropped", "jvm-unused")
    assert not any(r.startswith("package:") for _s, r, _d in rep.paths.values())
    _serves(new, image.config, 8080, '"java-http"')


@pytest.mark.slow
@pytest.mark.corpus
def test_node_entry_script_outside_workdir_serves() -> None:
    """node-express run as `node /app/server.js` from WorkingDir /: /app/node_modules is found from the
    entry script (it was dropped: "Cannot find module 'express'"), and the minimized tree serves."""
    image, source = _corpus_tree("node-express")
    config = dataclasses.replace(image.config, working_dir="/", cmd=("node", "/app/server.js"))
    new, rep = minimize(source, config)
    assert rep.paths["/app/node_modules/express/index.js"][:2] == ("kept", "node-modules")
    assert rep.paths["/app/package.json"][:2] == ("kept", "node-package")
    assert _dangling(new, source) == []
    _serves(new, config, 3000, '"node-express"')
