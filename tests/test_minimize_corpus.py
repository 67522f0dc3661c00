"""The rules the compatibility corpus taught `--minimize auto` (issue 13): every file the corpus showed was
dropped but needed is a test here, on small host-built trees (fast) and on the corpus images (slow).

- path-string: data files a kept program names by absolute path (Debian libnode's externalized builtins)
- symlink-target / dangling-after-minimize: no kept symlink dangles
- locale: LANG naming a locale of the locale archive keeps the archive
- glibc-libgcc: pthread_cancel/pthread_exit users get libgcc_s.so.1 (glibc dlopen()s it)
- interpreter:perl/ruby/php: module directories loaded by name at run time
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.flatten import flatten
from builder.minimize import minimize
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
