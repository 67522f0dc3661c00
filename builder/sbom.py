"""The guest's software bill of materials: CycloneDX 1.6 JSON of what is in the guest, never of the image.

`sbom(source, kept, subject)` lists every regular file of the kept tree (the minimized tree with the init
installed: what the initramfs or the disk holds) with its sha256, grouped into the components that own it:

  OS packages       dpkg (/var/lib/dpkg) and apk (/lib/apk/db/installed) packages owning at least one kept
                    file, from the source tree's database (builder/minimize/packages.py: the database itself
                    is usually not kept); version and architecture from the database, licences from apk's `L:`
                    or Debian's machine-readable /usr/share/doc/P/copyright (its `License:` fields, as
                    written: Debian short names such as GPL-2+ are not SPDX identifiers, they become named
                    licences; a valid SPDX identifier becomes an id); purl pkg:deb|apk/<os-release ID>/...
  language packages found in the KEPT tree only: Python `*.dist-info/METADATA` (files from its RECORD),
                    npm `node_modules/[@scope/]name/package.json` (files: its directory but nested
                    node_modules), jars (`META-INF/maven/*/*/pom.properties`, else META-INF/MANIFEST.MF's
                    Implementation-/Bundle- headers, else the file name; the file is the jar itself)
  the kernel        name linux, version = its release, sha256 of the artifact's kernel file, the sha256 of
                    its .config (a kernel xbuild built) and the fragments, as properties
  the init          /.xbuild/init and /.xbuild/config, the init's sha256
  other files       a kept file no component owns is a `file` component of its own.

A file belongs to one component: an OS package first, then a language package, else itself. Every metadata
file is untrusted: each is read up to META_LIMIT bytes; one that is too large, not UTF-8, not the expected
JSON object (deeply nested JSON included), or that names a package outside its registry's alphabet is
skipped: its package is not listed and its files stay in the inventory as plain files; the BOM says so in
an `xbuild:sbom:skipped` property (path and reason) per skipped item. Paths in RECORD that leave the tree
or name nothing kept are ignored. A path that is not UTF-8 is written with backslash escapes.

Reproducible: no clock, no randomness. The timestamp is SOURCE_DATE_EPOCH's (the build's epoch; omitted
without one), every bom-ref is derived from the component, and the serial number is a UUID derived from the
document's sha256 (computed with a zero serial).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import posixpath
import re
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.spdx import fixup_id
from packageurl import PackageURL

from .artifact import KERNEL, SBOM, KernelInfo, SbomInfo
from .cache import file_sha256, no_space
from .guest import CONFIG_PATH, INIT_PATH
from .minimize.packages import package_db
from .tree import FILE, ContentReader, Inode, Tree, open_content, read_content

SPEC = "1.6"
MEDIA_TYPE = "application/vnd.cyclonedx+json"
META_LIMIT = 1 << 20  # bytes of one metadata file (METADATA, package.json, copyright, pom.properties...)
SKIPPED = "xbuild:sbom:skipped"
ZERO = uuid.UUID(int=0)
SERIAL_NS = uuid.UUID("6f0d3e1c-5b0a-4d4e-9a57-2f8f1c0e7a11")  # uuid5 namespace of xbuild SBOM serials
# what a name may be, by registry (a name outside it is skipped, never guessed at)
DPKG_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{0,127}")
APK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
PYPI_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")
NPM_NAME = re.compile(r"(?:@[a-z0-9~][a-z0-9._~-]{0,100}/)?[a-z0-9~][a-z0-9._~-]{0,213}", re.I)
MAVEN_PART = re.compile(r"[A-Za-z0-9_.+-]{1,200}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~:_-]{0,127}")
LICENSE_MAX = 200  # characters of one licence name


@dataclass(frozen=True)
class KernelPart:
    """The paired kernel as the SBOM names it."""

    sha256: str
    release: str | None = None  # None for a kernel file xbuild did not build
    config_sha256: str | None = None
    fragments: tuple[str, ...] = ()
    source: str | None = None  # the --kernel PATH or oci:// it came from


@dataclass(frozen=True)
class Subject:
    """What the SBOM says about the guest as a whole: its metadata component and the build's facts."""

    name: str  # the source image reference
    image_digest: str  # the source image's manifest digest
    tool_version: str
    epoch: int | None  # SOURCE_DATE_EPOCH: the document's timestamp
    kernel: KernelPart | None = None


class _Skip(Exception):
    """A metadata file that is skipped, with the reason."""


def write_sbom(
    directory: Path,
    source: Tree,
    kept: Tree,
    subject: Subject,
    kernel: tuple[Path, KernelInfo] | None,
    digests: Mapping[str, str] | None = None,
) -> SbomInfo:
    """Write `directory`/sbom.cdx.json for the artifact being written there (its kernel file, if any, already
    copied in; `kernel` is where it came from and what the manifest says of it) and return the manifest's
    section. A cached kernel xbuild built (KernelInfo.key) has its .config beside it. `digests`: the sha256
    of files of `kept` already hashed (by pack, as it read them), so they are not read again."""
    if kernel is not None:
        path, info = kernel
        config = path.parent / "config" if info.key else None
        subject = dataclasses.replace(
            subject,
            kernel=KernelPart(
                sha256=file_sha256(directory / KERNEL),
                release=info.release,
                config_sha256=file_sha256(config) if config and config.is_file() else None,
                fragments=info.fragments or (),
                source=info.source,
            ),
        )
    doc = sbom(source, kept, subject, digests)
    with no_space(directory / SBOM):
        (directory / SBOM).write_bytes(doc)
    parsed = json.loads(doc)
    return SbomInfo(
        format=f"CycloneDX {SPEC}",
        size=len(doc),
        sha256=hashlib.sha256(doc).hexdigest(),
        components=sum(1 for c in parsed["components"] if c["type"] != "file"),
        files=sum(
            1 for c in parsed["components"] for f in [c, *c.get("components", ())] if f["type"] == "file"
        ),
    )


def sbom(source: Tree, kept: Tree, subject: Subject, digests: Mapping[str, str] | None = None) -> bytes:
    """The CycloneDX 1.6 JSON document (UTF-8, ends with a newline) of `kept`; see the module doc.
    `digests`: path -> sha256 of files of `kept` already known (the others are read and hashed)."""
    files = _hashes(kept, digests or {})
    owner: dict[str, str] = {}  # path -> bom-ref of the component it belongs to
    components: list[Component] = []
    skipped: list[str] = []

    def claim(ref: str, paths: Iterator[str] | list[str]) -> list[str]:
        mine = sorted({p for p in paths if p in files and p not in owner})
        for p in mine:
            owner[p] = ref
        return mine

    def add(c: Component, paths: list[str]) -> None:
        c.components = [_file(p, files[p]) for p in paths]
        components.append(c)

    init = [p for p in (INIT_PATH, CONFIG_PATH) if p in files]
    if init:
        add(
            Component(
                type=ComponentType.APPLICATION,
                name="xbuild-init",
                version=subject.tool_version,
                bom_ref="init",
                hashes=[_sha256(files[INIT_PATH])] if INIT_PATH in files else [],
                description="the guest's init (execs the image's entrypoint)",
            ),
            claim("init", init),
        )
    for c, paths in _os_packages(source, skipped):
        mine = claim(str(c.bom_ref.value), paths)
        if mine:
            add(c, mine)
    for c, paths in _language_packages(kept, files, skipped):
        add(c, claim(str(c.bom_ref.value), paths))
    for p in sorted(files):
        if p not in owner:
            components.append(_file(p, files[p]))
    if subject.kernel:
        components.append(_kernel(subject.kernel))
    return _render(components, skipped, subject)


# ---- files -------------------------------------------------------------------------------------------------


def _hashes(tree: Tree, known: Mapping[str, str]) -> dict[str, str]:
    """path → hex sha256 of every regular file of `tree` (a hardlink group hashed once), `known` ones taken
    from there."""
    out: dict[str, str] = {}
    seen: dict[int, str] = {}
    with ContentReader() as reader:
        for path, node in tree.walk():
            if node.kind != FILE:
                continue
            if path in known:
                seen.setdefault(id(node), known[path])
            if id(node) not in seen:
                h = hashlib.sha256()
                for chunk in reader.chunks(node):
                    h.update(chunk)
                seen[id(node)] = h.hexdigest()
            out[path] = seen[id(node)]
    return out


def _shown(path: str) -> str:
    """A tree path as the document writes it: absolute, undecodable bytes as backslash escapes."""
    return "/" + path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _sha256(hexdigest: str) -> HashType:
    return HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)


def _file(path: str, digest: str) -> Component:
    shown = _shown(path)
    return Component(type=ComponentType.FILE, name=shown, bom_ref=f"file:{shown}", hashes=[_sha256(digest)])


def _text(node: Inode | None, what: str) -> str:
    """The UTF-8 text of a metadata file of at most META_LIMIT bytes; _Skip otherwise."""
    if node is None or node.kind != FILE:
        raise _Skip(f"{what}: not a regular file")
    if node.size > META_LIMIT:
        raise _Skip(f"{what}: larger than {META_LIMIT} bytes")
    try:
        return read_content(node).decode()
    except UnicodeDecodeError:
        raise _Skip(f"{what}: not UTF-8") from None


def _version(value: object, what: str) -> str:
    if not isinstance(value, str) or not VERSION.fullmatch(value):
        raise _Skip(f"{what}: no valid version")
    return value


def _licenses(names: list[str]) -> list[DisjunctiveLicense]:
    """Each licence name as an SPDX id when it is one (case fixed), else as a named licence (no expressions:
    a list of names is what the databases hold)."""
    out = []
    for name in sorted({n.strip()[:LICENSE_MAX] for n in names if n.strip() and n.isprintable()}):
        spdx = fixup_id(name)
        out.append(DisjunctiveLicense(id=spdx) if spdx else DisjunctiveLicense(name=name))
    return out


# ---- OS packages -------------------------------------------------------------------------------------------


def _os_packages(source: Tree, skipped: list[str]) -> Iterator[tuple[Component, list[str]]]:
    """(component, the paths the package lists) of every dpkg/apk package of the source's database."""
    db = package_db(source)
    apk = source.lookup("lib/apk/db/installed", follow=True) is not None
    kind = "apk" if apk else "deb"
    name_re = APK_NAME if apk else DPKG_NAME
    distro = _os_release_id(source) or ("alpine" if apk else "debian")
    for pkg in sorted(db.files):
        meta = db.meta.get(pkg, {})
        where = f"{kind} package {pkg[:80]!r}"
        try:
            if not name_re.fullmatch(pkg):
                raise _Skip(f"{where}: not a valid package name")
            version = _version(meta.get("version"), where)
            licenses = [meta["license"]] if "license" in meta else _debian_licenses(source, pkg)
        except _Skip as e:
            if db.files[pkg]:
                skipped.append(str(e))
            continue
        arch = meta.get("arch", "")
        qualifiers = {"arch": arch} if name_re.fullmatch(arch) else {}
        purl = PackageURL(type=kind, namespace=distro, name=pkg, version=version, qualifiers=qualifiers)
        c = Component(
            type=ComponentType.LIBRARY if pkg.startswith("lib") else ComponentType.APPLICATION,
            name=pkg,
            version=version,
            purl=purl,
            bom_ref=purl.to_string(),
            licenses=_licenses(licenses),
        )
        yield c, db.files[pkg]


def _os_release_id(source: Tree) -> str | None:
    """/etc/os-release's ID (the purl namespace), when it is a plain lowercase word."""
    for path in ("etc/os-release", "usr/lib/os-release"):
        try:
            text = _text(source.lookup(path, follow=True), path)
        except _Skip:
            continue
        m = re.search(r'^ID="?([a-z0-9._-]{1,40})"?$', text, re.M)
        if m:
            return m.group(1)
    return None


def _debian_licenses(source: Tree, pkg: str) -> list[str]:
    """The `License:` short names of /usr/share/doc/<pkg>/copyright when it is machine-readable
    (copyright-format 1.0: a `Format:` field in the first paragraph); [] otherwise."""
    path = f"usr/share/doc/{pkg}/copyright"
    node = source.lookup(path, follow=True)
    if node is None:
        return []
    text = _text(node, f"/{path}")
    if not re.match(r"(?:\s*#.*\n)*\s*Format:\s*\S*copyright-format", text):
        return []
    return re.findall(r"^License:[ \t]*(\S[^\n]*)$", text, re.M)


# ---- language packages -------------------------------------------------------------------------------------


def _language_packages(
    kept: Tree, files: dict[str, str], skipped: list[str]
) -> Iterator[tuple[Component, list[str]]]:
    """(component, its paths) of every Python distribution, jar and npm package in the kept tree."""
    npm: dict[str, Component] = {}  # package directory -> its component
    for path, node in kept.walk():
        name = path.rsplit("/", 1)[-1]
        try:
            if name == "METADATA" and path.endswith(".dist-info/METADATA"):
                yield _python(kept, path, node, files)
            elif name == "package.json" and _npm_dir(path):
                npm[path.rsplit("/", 1)[0]] = _npm(path, node)
            elif name.endswith(".jar") and node.kind == FILE:
                yield _jar(path, node), [path]
        except _Skip as e:
            skipped.append(str(e))
    if npm:
        mine: dict[str, list[str]] = {d: [] for d in npm}
        for p in files:  # a file belongs to the package of the nearest directory above it
            d = p
            while "/" in d:
                d = d.rsplit("/", 1)[0]
                if d in mine:
                    mine[d].append(p)
                    break
                if d.endswith("/node_modules"):
                    break
        for d, c in sorted(npm.items()):
            yield c, mine[d]


def _python(kept: Tree, path: str, node: Inode, files: dict[str, str]) -> tuple[Component, list[str]]:
    """A Python distribution from its METADATA (Name, Version, License-Expression / License / licence
    classifiers); its files are RECORD's entries that resolve inside the tree."""
    where = _shown(path)
    headers = BytesHeaderParser(policy=compat32).parsebytes(_text(node, where).encode())
    name = headers.get("Name", "")
    if not isinstance(name, str) or not PYPI_NAME.fullmatch(name):
        raise _Skip(f"{where}: no valid Name")
    version = _version(headers.get("Version"), where)
    expr = headers.get("License-Expression")
    lic = headers.get("License")
    classifiers = [
        c.rsplit("::", 1)[-1].strip() for c in headers.get_all("Classifier", []) if c.startswith("License ::")
    ]
    names = [expr] if expr else ([lic] if lic and "\n" not in lic.strip() else classifiers)
    purl = PackageURL(type="pypi", name=name.lower(), version=version)
    dist = path.rsplit("/", 1)[0]
    c = Component(
        type=ComponentType.LIBRARY,
        name=name,
        version=version,
        purl=purl,
        bom_ref=f"{purl.to_string()}#{_shown(dist)}",
        licenses=_licenses([str(n) for n in names]),
    )
    return c, _record(kept, dist, files)


def _record(kept: Tree, dist: str, files: dict[str, str]) -> list[str]:
    """The kept files a dist-info's RECORD names (relative to its site directory; a path that leaves the
    tree or names nothing kept is ignored); [] without a readable RECORD."""
    try:
        text = _text(kept.lookup(f"{dist}/RECORD"), f"{dist}/RECORD")
    except _Skip:
        return [p for p in files if p.startswith(dist + "/")]
    site = posixpath.dirname(dist)
    out = []
    for row in csv.reader(text.splitlines()):
        if not row:
            continue
        p = posixpath.normpath(posixpath.join(site, row[0]))
        if not p.startswith("../") and p in files:
            out.append(p)
    return out


def _npm_dir(path: str) -> bool:
    """Whether `path` is node_modules/NAME/package.json or node_modules/@SCOPE/NAME/package.json."""
    parts = path.split("/")
    return (len(parts) >= 3 and parts[-3] == "node_modules") or (
        len(parts) >= 4 and parts[-4] == "node_modules" and parts[-3].startswith("@")
    )


def _npm(path: str, node: Inode) -> Component:
    """An npm package from its package.json (name, version, license as a string or {type})."""
    where = _shown(path)
    try:
        meta = json.loads(_text(node, where))
    except ValueError as e:
        raise _Skip(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise _Skip(f"{where}: nested too deeply") from None
    if not isinstance(meta, dict):
        raise _Skip(f"{where}: not a JSON object")
    name = meta.get("name")
    if not isinstance(name, str) or not NPM_NAME.fullmatch(name):
        raise _Skip(f"{where}: no valid name")
    version = _version(meta.get("version"), where)
    lic = meta.get("license")
    if isinstance(lic, dict):
        lic = lic.get("type")
    scope, _, base = name.rpartition("/")
    purl = PackageURL(type="npm", namespace=scope or None, name=base, version=version)
    return Component(
        type=ComponentType.LIBRARY,
        name=name,
        version=version,
        purl=purl,
        bom_ref=f"{purl.to_string()}#{_shown(path.rsplit('/', 1)[0])}",
        licenses=_licenses([lic] if isinstance(lic, str) else []),
    )


def _jar(path: str, node: Inode) -> Component:
    """A jar from its pom.properties (groupId, artifactId, version), else MANIFEST.MF's
    Implementation-Title/-Version or Bundle-SymbolicName/-Version, else its file name without a version."""
    where = _shown(path)
    group, artifact, version = None, None, None
    try:
        with open_content(node) as raw, zipfile.ZipFile(raw) as jar:
            names = jar.namelist()
            pom = next(
                (n for n in names if re.fullmatch(r"META-INF/maven/[^/]+/[^/]+/pom\.properties", n)), None
            )
            if pom:
                props = dict(
                    re.findall(r"^\s*([A-Za-z]+)\s*[=:]\s*(.*?)\s*$", _member(jar, pom, where), re.M)
                )
                group, artifact, version = props.get("groupId"), props.get("artifactId"), props.get("version")
            elif "META-INF/MANIFEST.MF" in names:
                mf = dict(
                    re.findall(
                        r"^([A-Za-z-]+):\s*(.*?)\s*$", _member(jar, "META-INF/MANIFEST.MF", where), re.M
                    )
                )
                artifact = mf.get("Implementation-Title") or mf.get("Bundle-SymbolicName", "").split(";")[0]
                version = mf.get("Implementation-Version") or mf.get("Bundle-Version")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError) as e:
        raise _Skip(f"{where}: not a readable jar ({e})") from None
    if not artifact:
        artifact = re.sub(r"-\d[\w.+-]*$", "", path.rsplit("/", 1)[-1][: -len(".jar")])
    if not MAVEN_PART.fullmatch(artifact) or (group is not None and not MAVEN_PART.fullmatch(group)):
        raise _Skip(f"{where}: no valid artifact name")
    version = _version(version, where) if version else None
    purl = PackageURL(type="maven", namespace=group, name=artifact, version=version) if group else None
    return Component(
        type=ComponentType.LIBRARY,
        name=artifact,
        group=group,
        version=version,
        purl=purl,
        bom_ref=f"jar:{where}",
    )


def _member(jar: zipfile.ZipFile, name: str, where: str) -> str:
    """A small text member of a jar (at most META_LIMIT bytes uncompressed, UTF-8); _Skip otherwise."""
    info = jar.getinfo(name)
    if info.file_size > META_LIMIT:
        raise _Skip(f"{where}: {name} larger than {META_LIMIT} bytes")
    with jar.open(info) as f:
        data = f.read(META_LIMIT + 1)
    if len(data) > META_LIMIT:
        raise _Skip(f"{where}: {name} larger than {META_LIMIT} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise _Skip(f"{where}: {name} not UTF-8") from None


# ---- kernel, document --------------------------------------------------------------------------------------


def _kernel(k: KernelPart) -> Component:
    props = [Property(name="xbuild:kernel:file", value="kernel")]
    if k.config_sha256:
        props.append(Property(name="xbuild:kernel:config-sha256", value=k.config_sha256))
    if k.fragments:
        props.append(Property(name="xbuild:kernel:fragments", value="+".join(k.fragments)))
    if k.source:
        props.append(Property(name="xbuild:kernel:source", value=k.source))
    return Component(
        type=ComponentType.OPERATING_SYSTEM,
        name="linux",
        version=k.release,
        bom_ref="kernel",
        hashes=[_sha256(k.sha256)],
        properties=props,
        description="the guest kernel (the artifact's kernel file)",
    )


def _render(components: list[Component], skipped: list[str], subject: Subject) -> bytes:
    """The document: rendered with a zero serial, which is then replaced by the one derived from that text."""
    guest = Component(
        type=ComponentType.CONTAINER,
        name=subject.name,
        version=subject.image_digest,
        bom_ref="guest",
        description="an xbuild VM image: the files of its initramfs (or root disk) and its kernel",
    )
    xbuild = Component(
        type=ComponentType.APPLICATION, name="xbuild", version=subject.tool_version, bom_ref="tool:xbuild"
    )
    meta = BomMetaData(
        component=guest,
        tools=ToolRepository(components=[xbuild]),
        timestamp=datetime.fromtimestamp(subject.epoch or 0, UTC),
        properties=[Property(name=SKIPPED, value=s) for s in skipped],
    )
    if subject.epoch is None:
        meta.timestamp = None  # type: ignore[assignment]
    bom = Bom(components=components, metadata=meta, serial_number=ZERO)
    with warnings.catch_warnings():  # no dependency graph is claimed: the BOM lists what the guest holds
        warnings.filterwarnings("ignore", "The Component this BOM is describing", UserWarning)
        draft = JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
    zero = f'"serialNumber": "{ZERO.urn}"'
    assert draft.count(zero) == 1
    serial = uuid.uuid5(SERIAL_NS, hashlib.sha256(draft.encode()).hexdigest())
    return draft.replace(zero, f'"serialNumber": "{serial.urn}"').encode()
