"""The guest's SBOM (builder/sbom.py, `xbuild sbom`): what it lists, that it is schema-valid CycloneDX 1.6 and
reproducible, that hostile metadata is skipped (never a traceback, never a failed build), and that real
builds of the busybox and nginx fixtures list exactly the files and dpkg packages the initramfs holds.

Every document is checked against the CycloneDX 1.6 JSON schema shipped with cyclonedx-python-lib (its
strict validator, jsonschema underneath)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder.artifact import MANIFEST, SBOM
from builder.flatten import flatten
from builder.minimize.packages import package_db
from builder.reference import parse
from builder.sbom import META_LIMIT, SKIPPED, KernelPart, Subject, sbom
from builder.source import SourceOptions, load
from builder.tree import Tree, regular
from tests.fixtures.hostile import XBUILD, Sandbox, assert_refused
from tests.fixtures.images import OciImage, busybox_members, file, make_busybox_image, write_oci_image

DIGEST = "sha256:" + "1" * 64
SUBJECT = Subject("docker://example.test/app:v1", DIGEST, "0.1.0", 1700000000)
STATUS = b"""Package: libc6
Status: install ok installed
Version: 2.36-9+deb12u4
Architecture: amd64
Depends: libgcc-s1

Package: busybox
Status: install ok installed
Version: 1:1.35.0-4
Architecture: amd64

Package: gone
Status: install ok installed
Version: 1.0
"""
COPYRIGHT = b"""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: glibc

Files: *
Copyright: the authors
License: LGPL-2.1+
 The text of the licence.

Files: debian/*
License: GPL-2+
"""


def valid(doc: bytes) -> dict[str, Any]:
    """The document parsed, after the CycloneDX 1.6 schema accepted it."""
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(doc.decode())
    assert error is None, error
    parsed: dict[str, Any] = json.loads(doc)
    assert parsed["specVersion"] == "1.6" and parsed["bomFormat"] == "CycloneDX"
    return parsed


def components(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """bom-ref → top-level component."""
    return {c["bom-ref"]: c for c in doc["components"]}


def files_of(c: dict[str, Any]) -> dict[str, str]:
    """name → sha256 of a component's file components."""
    return {f["name"]: f["hashes"][0]["content"] for f in c.get("components", ())}


def all_files(doc: dict[str, Any]) -> dict[str, str]:
    """name → sha256 of every file the document lists (owned or not)."""
    out: dict[str, str] = {}
    for c in doc["components"]:
        for f in [c, *c.get("components", ())]:
            if f["type"] == "file":
                assert f["name"] not in out, f"{f['name']} listed twice"
                out[f["name"]] = f["hashes"][0]["content"]
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(zipfile.ZipInfo(name, (2023, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def debian_tree() -> Tree:
    t = Tree()
    for path, data in {
        "etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n',
        "var/lib/dpkg/status": STATUS,
        "var/lib/dpkg/info/libc6:amd64.list": b"/.\n/usr\n/usr/lib/x86_64-linux-gnu/libc.so.6\n"
        b"/usr/share/doc/libc6/copyright\n",
        "var/lib/dpkg/info/busybox.list": b"/bin\n/bin/busybox\n",
        "var/lib/dpkg/info/gone.list": b"/usr/bin/gone\n",
        "usr/lib/x86_64-linux-gnu/libc.so.6": b"\x7fELF libc",
        "usr/share/doc/libc6/copyright": COPYRIGHT,
        "bin/busybox": b"\x7fELF busybox",
        "usr/bin/gone": b"dropped by minimize",
        "app/main.py": b"print('hi')\n",
        "srv/lib/python3/site-packages/Flask-3.0.0.dist-info/METADATA": b"Metadata-Version: 2.1\n"
        b"Name: Flask\nVersion: 3.0.0\nClassifier: License :: OSI Approved :: BSD License\n",
        "srv/lib/python3/site-packages/Flask-3.0.0.dist-info/RECORD": b"flask/__init__.py,sha256=x,3\n"
        b"Flask-3.0.0.dist-info/METADATA,,\n../../../../../app/main.py,,\n/etc/os-release,,\n",
        "srv/lib/python3/site-packages/flask/__init__.py": b"x=1",
        "srv/node_modules/express/package.json": b'{"name":"express","version":"4.18.2","license":"MIT"}',
        "srv/node_modules/express/index.js": b"module.exports = 1",
        "srv/node_modules/express/node_modules/qs/package.json": b'{"name":"qs","version":"6.11.0",'
        b'"license":{"type":"BSD-3-Clause"}}',
        "srv/node_modules/express/node_modules/qs/lib/index.js": b"qs",
        "srv/node_modules/@types/node/package.json": b'{"name":"@types/node","version":"20.1.0"}',
        "srv/lib/guava-32.1.jar": jar(
            {
                "META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\r\nBundle-SymbolicName: x\r\n",
                "META-INF/maven/com.google.guava/guava/pom.properties": b"version=32.1.2\n"
                b"groupId=com.google.guava\nartifactId=guava\n",
            }
        ),
        "srv/lib/plain.jar": jar(
            {"META-INF/MANIFEST.MF": b"Implementation-Title: plain\nImplementation-Version: 2.0\n"}
        ),
        ".xbuild/init": b"\x7fELF init",
        ".xbuild/config": b"config",
    }.items():
        t.add(path, regular(data))
    return t


def kept_of(source: Tree, drop: tuple[str, ...]) -> Tree:
    """`source` without the paths `drop` (what the minimizer would return; inodes shared)."""
    kept = Tree()
    for path, node in source.walk():
        if node.kind != "dir" and path not in drop:
            kept.add(path, node)
    return kept


def test_os_and_language_packages_with_their_kept_files() -> None:
    source = debian_tree()
    kept = kept_of(source, ("usr/bin/gone", "var/lib/dpkg/status"))
    doc = valid(sbom(source, kept, SUBJECT))
    c = components(doc)
    libc = c["pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64"]
    assert libc["name"] == "libc6" and libc["version"] == "2.36-9+deb12u4"
    assert [lic["license"] for lic in libc["licenses"]] == [{"id": "LGPL-2.1+"}, {"name": "GPL-2+"}]
    assert files_of(libc) == {
        "/usr/lib/x86_64-linux-gnu/libc.so.6": sha(b"\x7fELF libc"),
        "/usr/share/doc/libc6/copyright": sha(COPYRIGHT),
    }
    busybox = c["pkg:deb/debian/busybox@1:1.35.0-4?arch=amd64"]
    assert files_of(busybox) == {"/bin/busybox": sha(b"\x7fELF busybox")}
    assert not [r for r in c if r.startswith("pkg:deb/debian/gone")], (
        "a package none of whose files is kept is not in the guest"
    )
    flask = next(v for k, v in c.items() if k.startswith("pkg:pypi/flask@3.0.0"))
    assert flask["licenses"] == [{"license": {"name": "BSD License"}}]
    # RECORD's entries that leave the site directory or name another package's file are not Flask's
    assert set(files_of(flask)) == {
        "/srv/lib/python3/site-packages/flask/__init__.py",
        "/srv/lib/python3/site-packages/Flask-3.0.0.dist-info/METADATA",
    }
    express = next(v for k, v in c.items() if k.startswith("pkg:npm/express@4.18.2"))
    qs = next(v for k, v in c.items() if k.startswith("pkg:npm/qs@6.11.0"))
    types = next(v for k, v in c.items() if k.startswith("pkg:npm/%40types/node@20.1.0"))
    assert set(files_of(express)) == {
        "/srv/node_modules/express/package.json",
        "/srv/node_modules/express/index.js",
    }
    assert set(files_of(qs)) == {
        "/srv/node_modules/express/node_modules/qs/package.json",
        "/srv/node_modules/express/node_modules/qs/lib/index.js",
    }
    assert qs["licenses"] == [{"license": {"id": "BSD-3-Clause"}}] and types["name"] == "@types/node"
    guava = c["jar:/srv/lib/guava-32.1.jar"]
    assert (guava["group"], guava["name"], guava["version"]) == ("com.google.guava", "guava", "32.1.2")
    assert guava["purl"] == "pkg:maven/com.google.guava/guava@32.1.2"
    plain = c["jar:/srv/lib/plain.jar"]
    assert (plain["name"], plain["version"], "purl" in plain) == ("plain", "2.0", False)
    init = c["init"]
    assert set(files_of(init)) == {"/.xbuild/init", "/.xbuild/config"}
    assert init["hashes"][0]["content"] == sha(b"\x7fELF init")
    # every kept regular file exactly once, with its sha256; nothing of the source that was dropped
    listed = all_files(doc)
    want = {"/" + p: sha(source.read(p)) for p, n in kept.walk() if n.kind == "file"}
    assert listed == want
    assert c["file:/app/main.py"]["type"] == "file" and "/usr/bin/gone" not in listed
    assert doc["metadata"]["component"]["name"] == SUBJECT.name
    assert doc["metadata"]["component"]["version"] == DIGEST
    assert doc["metadata"]["timestamp"] == "2023-11-14T22:13:20+00:00"
    assert "properties" not in doc["metadata"]


def test_the_kernel_component() -> None:
    kernel = KernelPart("a" * 64, "6.1.192", "b" * 64, ("base", "xen"))
    doc = valid(sbom(Tree(), Tree(), Subject("x", DIGEST, "0.1.0", None, kernel)))
    k = components(doc)["kernel"]
    assert (k["type"], k["name"], k["version"], k["hashes"][0]["content"]) == (
        "operating-system",
        "linux",
        "6.1.192",
        "a" * 64,
    )
    props = {p["name"]: p["value"] for p in k["properties"]}
    assert props["xbuild:kernel:config-sha256"] == "b" * 64 and props["xbuild:kernel:fragments"] == "base+xen"
    assert "timestamp" not in doc["metadata"], "no epoch: no clock reading"


def test_apk_database() -> None:
    t = Tree()
    t.add("etc/os-release", regular(b"ID=alpine\n"))
    t.add(
        "lib/apk/db/installed",
        regular(b"P:musl\nV:1.2.4-r2\nA:x86_64\nL:MIT\nF:lib\nR:ld-musl-x86_64.so.1\n\nP:busybox\nV:1.36\n"),
    )
    t.add("lib/ld-musl-x86_64.so.1", regular(b"musl"))
    assert package_db(t).meta["musl"] == {"version": "1.2.4-r2", "arch": "x86_64", "license": "MIT"}
    c = components(valid(sbom(t, t, SUBJECT)))
    musl = c["pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64"]
    assert musl["licenses"] == [{"license": {"id": "MIT"}}]
    assert files_of(musl) == {"/lib/ld-musl-x86_64.so.1": sha(b"musl")}


def test_reproducible_and_the_serial_follows_the_content() -> None:
    source = debian_tree()
    one, two = sbom(source, source, SUBJECT), sbom(debian_tree(), debian_tree(), SUBJECT)
    assert one == two
    source.add("app/main.py", regular(b"print('changed')\n"))
    three = sbom(source, source, SUBJECT)
    assert json.loads(one)["serialNumber"] != json.loads(three)["serialNumber"]
    assert json.loads(one)["serialNumber"].startswith("urn:uuid:")


# ---- hostile metadata: skipped, said so, never fatal ------------------------------------------------------

# case -> (the planted files, the reason the SBOM gives for skipping them); all planted in one image
HOSTILE: dict[str, tuple[dict[str, bytes], str]] = {
    "huge METADATA": (
        {"h/huge/x-1.dist-info/METADATA": b"Name: x\nVersion: 1\n" + b"X: " + b"y" * META_LIMIT + b"\n"},
        "larger than",
    ),
    "METADATA not UTF-8": ({"h/utf/x-1.dist-info/METADATA": b"Name: \xff\xfe\nVersion: 1\n"}, "not UTF-8"),
    "METADATA without a name": ({"h/noname/x-1.dist-info/METADATA": b"Version: 1\n"}, "no valid Name"),
    "package.json nested 100000 deep": (
        {"h/deep/node_modules/a/package.json": b"[" * 100000 + b"]" * 100000},
        "nested too deeply",
    ),
    "package.json not UTF-8": ({"h/utf/node_modules/a/package.json": b'{"name":"\xff"}'}, "not UTF-8"),
    "package.json not JSON": ({"h/json/node_modules/a/package.json": b'{"name":'}, "not JSON"),
    "package.json a list": ({"h/list/node_modules/a/package.json": b"[1]"}, "not a JSON object"),
    "package.json path name": (
        {"h/path/node_modules/a/package.json": b'{"name":"../../etc/passwd","version":"1"}'},
        "no valid name",
    ),
    "package.json version with a newline": (
        {"h/nl/node_modules/a/package.json": b'{"name":"a","version":"1\\n\\u0000"}'},
        "no valid version",
    ),
    "jar that is not a zip": ({"h/lib/x.jar": b"PK\x03\x04 not really"}, "not a readable jar"),
    "jar with a huge pom.properties": (
        {
            "h/lib/y.jar": jar(
                {"META-INF/maven/g/a/pom.properties": b"groupId=g\nartifactId=a\n" + b"#" * (META_LIMIT + 1)}
            )
        },
        "larger than",
    ),
    "dpkg name with a slash": (
        {"var/lib/dpkg/info/x%2f..list": b"/etc/passwd\n"},
        "not a valid package name",
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox + a dist-info + every HOSTILE case's files, built by the CLI with --minimize none (so they are
    in the guest) and no kernel; the build must succeed with nothing on stderr."""
    work = tmp_path_factory.mktemp("sbom-art")
    layout = work / "oci"
    planted = {"usr/lib/python3/site-packages/x-1.dist-info/METADATA": b"Name: x\nVersion: 1\n"}
    for files, _ in HOSTILE.values():
        planted.update(files)
    write_oci_image(
        layout, "t", [busybox_members(), [file(p, d) for p, d in planted.items()]], {"Cmd": ["sh"]}
    )
    out = work / "art"
    box = Sandbox(work / "box")
    for d in (box.home, box.tmp, box.cache, box.root / "work"):
        d.mkdir(parents=True)
    r = box.xbuild(f"oci:{layout}:t", "-o", str(out), "--kernel", "none", "--minimize", "none", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return out


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_metadata_is_skipped(case: str, built: Path) -> None:
    """The SBOM is valid, says what it skipped and why, and lists the skipped files as plain files."""
    planted, reason = HOSTILE[case]
    doc = valid((built / SBOM).read_bytes())
    skipped = [p["value"] for p in doc["metadata"]["properties"] if p["name"] == SKIPPED]
    path = next(iter(planted))
    where = "x%2f." if path.endswith(".list") else "/" + path
    mine = [line for line in skipped if where in line]
    assert len(mine) == 1 and reason in mine[0], skipped
    listed = all_files(doc)
    for path, data in planted.items():
        assert listed["/" + path] == sha(data)
        assert components(doc)["file:/" + path]["type"] == "file"


def test_a_dpkg_status_of_junk_skips_the_bad_packages() -> None:
    t = debian_tree()
    junk = (
        b"Package: ok\nVersion: 1.0\n\nPackage: ../../x\nVersion: 1\n\nPackage: nover\n\n\xff\xfe\x00" * 20000
    )
    t.add("var/lib/dpkg/status", regular(STATUS + b"\n" + junk))
    for name in ("ok", "nover", "Bad Name"):
        t.add(f"var/lib/dpkg/info/{name}.list", regular(f"/usr/bin/{name}\n".encode()))
        t.add(f"usr/bin/{name}", regular(name.encode()))
    doc = valid(sbom(t, t, SUBJECT))
    c = components(doc)
    assert "pkg:deb/debian/ok@1.0" in c
    skipped = sorted(p["value"] for p in doc["metadata"]["properties"])
    assert skipped == [
        "deb package 'Bad Name': not a valid package name",
        "deb package 'nover': no valid version",
    ]
    assert all_files(doc)["/usr/bin/nover"] == sha(b"nover")


def test_a_path_that_is_not_utf8_is_escaped() -> None:
    t = Tree()
    name = b"srv/caf\xe9\n.txt".decode("utf-8", "surrogateescape")
    t.add(name, regular(b"x"))
    doc = valid(sbom(t, t, SUBJECT))
    assert all_files(doc) == {"/srv/caf\\xe9\n.txt": sha(b"x")}


# ---- real builds through the CLI ---------------------------------------------------------------------------


def initrd_files(art: Path, into: Path) -> dict[str, str]:
    """'/path' → sha256 of every regular file of the artifact's initramfs, extracted by the real `cpio`."""
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO((art / "initrd.img").read_bytes())).read()
    into.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=raw, cwd=into, check=True)
    return {
        "/" + str(p.relative_to(into)): sha(p.read_bytes())
        for p in sorted(into.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def check_build(art: Path, image: OciImage, tmp: Path) -> dict[str, Any]:
    """The artifact's SBOM is schema-valid, recorded in its manifest, lists every regular file of the
    initramfs with its sha256, and the dpkg packages it lists are exactly those owning one of them."""
    doc_bytes = (art / SBOM).read_bytes()
    doc = valid(doc_bytes)
    section = json.loads((art / MANIFEST).read_text())["sbom"]
    assert section["sha256"] == sha(doc_bytes) and section["size"] == len(doc_bytes)
    assert section["format"] == "CycloneDX 1.6"
    in_guest = initrd_files(art, tmp / "x")
    assert all_files(doc) == in_guest
    src = flatten(load(parse(image.ref), SourceOptions())).tree
    db = package_db(src)
    owning = {pkg for path in in_guest for pkg in db.owners.get(path[1:], ())}
    listed = {c["name"] for c in doc["components"] if c.get("purl", "").startswith("pkg:deb/")}
    assert listed == owning
    return doc


def test_busybox_build(sandbox: Sandbox, tmp_path: Path) -> None:
    image = make_busybox_image(sandbox.root / "oci")
    r = sandbox.xbuild(image.ref, "-o", str(sandbox.out), "--kernel", "none", "-q")
    assert r.returncode == 0, r.stderr
    doc = check_build(sandbox.out, image, tmp_path)
    assert {c["bom-ref"] for c in doc["components"] if c["type"] != "file"} == {"init"}
    printed = sandbox.xbuild("sbom", str(sandbox.out))
    assert printed.returncode == 0 and printed.stdout.encode() == (sandbox.out / SBOM).read_bytes()
    again = sandbox.root / "work" / "again"
    r = sandbox.xbuild(image.ref, "-o", str(again), "--kernel", "none", "-q")
    assert r.returncode == 0, r.stderr
    assert (again / SBOM).read_bytes() == (sandbox.out / SBOM).read_bytes(), "same input, same SBOM bytes"


@pytest.mark.slow
def test_nginx_build(nginx_image: OciImage, tmp_path: Path) -> None:
    """The nginx look-alike with the default kernel, built in the shared cache (its warm kernel: a sandbox's
    empty cache would build one)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    r = subprocess.run(
        [*XBUILD, nginx_image.ref, "-o", str(out), "--no-verify", "-q"],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    doc = check_build(out, nginx_image, tmp_path)
    c = {x["name"]: x for x in doc["components"] if x["type"] != "file"}
    assert {"nginx", "nginx-common", "libc6", "libssl3", "zlib1g"} <= set(c)
    assert c["nginx"]["version"].startswith("1.22")
    assert any(lic["license"].get("name") == "GPL-2+" for lic in c["nginx"]["licenses"])
    kernel = c["linux"]
    assert kernel["hashes"][0]["content"] == sha((out / "kernel").read_bytes())
    manifest = json.loads((out / MANIFEST).read_text())
    assert kernel["version"] == manifest["kernel"]["release"]
    config = Path(os.environ["XBUILD_CACHE"]) / "kernels" / manifest["kernel"]["key"] / "config"
    props = {p["name"]: p["value"] for p in kernel["properties"]}
    assert props["xbuild:kernel:config-sha256"] == sha(config.read_bytes())


def test_sbom_of_a_pushed_image(sandbox: Sandbox, registry: Any) -> None:
    image = make_busybox_image(sandbox.root / "oci")
    ref = f"{registry.host}/sbom/busybox:v1"
    r = sandbox.xbuild(image.ref, "-o", str(sandbox.out), "--kernel", "none", "-q", "--push", ref)
    assert r.returncode == 0, r.stderr
    printed = sandbox.xbuild("sbom", ref)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.encode() == (sandbox.out / SBOM).read_bytes()


# ---- hostile artifacts -------------------------------------------------------------------------------------


def _tamper_content(art: Path) -> None:
    data = bytearray((art / SBOM).read_bytes())
    data[data.index(b'"version": "1"')] ^= 1  # the same size, another byte
    (art / SBOM).write_bytes(bytes(data))


def _manifest(change: Any) -> Any:
    def edit(art: Path) -> None:
        m = json.loads((art / MANIFEST).read_text())
        change(m)
        (art / MANIFEST).write_text(json.dumps(m))

    return edit


ARTIFACTS = {
    "content changed": (_tamper_content, "does not match the sha256"),
    "truncated": (
        lambda a: (a / SBOM).write_bytes((a / SBOM).read_bytes()[:100]),
        "sbom.cdx.json is 100 bytes",
    ),
    "missing": (lambda a: (a / SBOM).unlink(), "missing sbom.cdx.json"),
    "a symlink": (
        lambda a: ((a / SBOM).unlink(), (a / SBOM).symlink_to("/etc/passwd")),
        "sbom.cdx.json is a symlink",
    ),
    "no section": (_manifest(lambda m: m.pop("sbom")), "no sbom.cdx.json in this artifact"),
    "section names another file": (_manifest(lambda m: m["sbom"].update(file="../x")), "sbom.file"),
}


@pytest.mark.parametrize("case", ARTIFACTS)
def test_xbuild_sbom_refuses_a_tampered_artifact(built: Path, sandbox: Sandbox, case: str) -> None:
    art = sandbox.root / "work" / "art"
    subprocess.run(["cp", "-a", str(built), str(art)], check=True)
    change, needle = ARTIFACTS[case]
    change(art)
    before = sandbox.snapshot()
    r = sandbox.xbuild("sbom", str(art))
    assert_refused(r, 2, needle)
    assert r.stdout == "" and sandbox.changes(before) == []


def test_the_planted_dist_info_is_listed(built: Path) -> None:
    c = components(valid((built / SBOM).read_bytes()))
    assert "pkg:pypi/x@1#/usr/lib/python3/site-packages/x-1.dist-info" in c
