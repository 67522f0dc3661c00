"""The image's package databases: which package owns which file, and what it depends on.

`package_db(tree)` reads dpkg's /var/lib/dpkg/info/*.list + /var/lib/dpkg/status or apk's
/lib/apk/db/installed from the image (untrusted text: a line that names nothing in the tree is skipped);
`stem(pkg)` groups the packages built from one source by name. The minimizer's package rule uses both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..tree import DIR, SYMLINK, Tree


@dataclass(frozen=True)
class PackageDb:
    """The installed packages of an image, every path a real tree path (symlinks on the way resolved)."""

    owners: dict[str, set[str]]  # real path -> the packages listing it
    files: dict[str, list[str]]  # package -> the real paths it lists (files and symlinks, no directories)
    depends: dict[str, list[str]]  # package -> the packages of its Pre-Depends/Depends (first alternative)
    # package -> what the database says of it, as written there (untrusted text): "version", "arch", and for
    # apk "license" (dpkg keeps licences in /usr/share/doc/P/copyright, read by builder/sbom.py)
    meta: dict[str, dict[str, str]] = field(default_factory=dict)


_APK_META = {"V:": "version", "A:": "arch", "L:": "license"}  # apk's installed-database letters


def stem(pkg: str) -> str:
    """'nginx-common' -> 'nginx', 'libpython3.11-stdlib' -> 'python3.11': packages of one source."""
    return re.sub(r"^lib", "", pkg).split("-", 1)[0]


def package_db(tree: Tree) -> PackageDb:
    """The packages of dpkg's /var/lib/dpkg/info/*.list + status, or apk's /lib/apk/db/installed.
    Empty without a database."""
    owners: dict[str, set[str]] = {}
    files: dict[str, list[str]] = {}
    depends: dict[str, list[str]] = {}
    meta: dict[str, dict[str, str]] = {}

    def add(pkg: str, path: str) -> None:
        try:
            real = tree.real_path(path, follow=False)  # a package owns its symlinks, not their targets
        except LookupError:
            return
        n = tree.lookup(real)
        if n is None or n.kind == DIR:
            return
        if n.kind == SYMLINK:
            t = tree.lookup(real, follow=True)
            if t is not None and t.kind == DIR:  # /bin -> usr/bin is listed by every package in /bin
                return
        owners.setdefault(real, set()).add(pkg)
        files.setdefault(pkg, []).append(real)

    info = tree.lookup("var/lib/dpkg/info", follow=True)
    if info is not None and info.children:
        for name in sorted(info.children):
            if name.endswith(".list"):
                pkg = name[:-5].split(":", 1)[0]
                files.setdefault(pkg, [])
                try:
                    listed = tree.read(f"var/lib/dpkg/info/{name}")
                except FileNotFoundError:  # a directory, a dangling or looping symlink: no file list
                    continue
                for line in listed.decode("utf-8", "replace").splitlines():
                    if line.strip() and line != "/.":
                        add(pkg, line.strip().lstrip("/"))
        try:
            status = tree.read("var/lib/dpkg/status").decode("utf-8", "replace")
        except FileNotFoundError:
            status = ""
        for para in status.split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", para, re.M))
            if "Package" in fields:
                deps = []
                for key in ("Pre-Depends", "Depends"):
                    for alt in fields.get(key, "").split(","):
                        first = alt.split("|")[0].strip().split(" ")[0].split(":")[0]
                        if first:
                            deps.append(first)
                depends[fields["Package"]] = deps
                meta[fields["Package"]] = {
                    k: fields[f] for k, f in (("version", "Version"), ("arch", "Architecture")) if f in fields
                }
    try:
        apk = tree.read("lib/apk/db/installed").decode("utf-8", "replace")
    except FileNotFoundError:
        apk = ""
    for para in apk.split("\n\n"):
        pkg, d = "", ""
        deps = []
        about: dict[str, str] = {}
        for line in para.splitlines():
            if line.startswith("P:"):
                pkg = line[2:]
                files.setdefault(pkg, [])
            elif line[:2] in _APK_META:
                about[_APK_META[line[:2]]] = line[2:]
            elif line.startswith("F:"):
                d = line[2:]
            elif line.startswith("R:") and pkg:
                add(pkg, f"{d}/{line[2:]}" if d else line[2:])
            elif line.startswith("D:"):
                deps = [w for w in line[2:].split() if not w.startswith(("so:", "cmd:", "pc:", "!"))]
        if pkg:
            depends[pkg] = [re.split(r"[<>=~]", x)[0] for x in deps]
            meta[pkg] = about
    return PackageDb(owners, files, depends, meta)
