"""OCI 1.1 referrers: artifacts (SBOMs, provenance, signatures) pushed with a `subject` naming the manifest
they are about, and listed by that manifest's digest (opencontainers/distribution-spec, "Listing Referrers"
and "Referrers Tag Schema").

- `attach` pushes a referrer: the empty config (EMPTY), one layer (the document), `artifactType`, `subject`,
  PUT by digest. A registry with the referrers API says so with an `OCI-Subject` header on that PUT; without
  it (Debian's docker-registry, distribution 2.8, stores the manifest and says nothing) the referrer is
  added to the subject's referrers index, the image index tagged `sha256-<hex of the subject digest>`,
  read-modify-write: read (accepting any manifest type: distribution answers 404 for a manifest of a type
  the Accept header leaves out; 404: start empty; anything but an OCI index: refused, left alone), append
  unless listed, PUT, read again to see our entry survived a concurrent writer (else again, TAG_TRIES times).
- `list_referrers` asks `GET /v2/<repo>/referrers/<digest>` (filtered by artifactType client-side too: a
  registry may ignore the filter); a 404 means no referrers API, and the tag schema's index is read
  instead; no index there means no referrers.
- `fetch_one` reads one listed referrer's manifest (verified against its digest, through the blob cache),
  checks that its subject is the digest asked about and its type, and returns its one layer's bytes
  (verified, at most `limit`).

Everything a registry answers is bounded (MANIFEST_LIMIT) and checked; refusals are the repository's error
type, the message starting with its `what`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..blobs import check_digest
from ..errors import SourceError
from .client import Body
from .manifest import ACCEPT, MANIFEST_LIMIT, OCI_INDEX, OCI_MANIFEST, Descriptor, load_json
from .repository import Repository

EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()
TITLE = "org.opencontainers.image.title"
TAG_TRIES = 3
API, TAG_SCHEMA = "referrers API", "tag schema"


@dataclass(frozen=True)
class Subject:
    """The manifest a referrer is about: its media type, digest and size."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Referrer:
    """One entry of a referrers list."""

    digest: str
    size: int
    artifact_type: str
    annotations: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Attached:
    """A referrer pushed: its manifest digest and how it is listed (API or TAG_SCHEMA)."""

    digest: str
    how: str


class _Absent(Exception):
    """A 404 where a 404 has a meaning (no referrers API, no referrers index yet)."""


def subject_of(repo: Repository, reference: str) -> Subject:
    """The manifest `reference` (a tag or digest) names, as a subject: fetched and verified (through the
    blob cache when pinned); an index is a subject too."""
    raw, digest = repo._manifest(reference, reference if reference.startswith("sha256:") else None)
    with repo.own_errors():
        doc = load_json(raw, f"{repo.what} manifest")
    media_type = doc.get("mediaType")
    return Subject(media_type if isinstance(media_type, str) else OCI_MANIFEST, digest, len(raw))


def attach(
    repo: Repository,
    subject: Subject,
    artifact_type: str,
    content: bytes | Path,
    media_type: str,
    title: str,
    annotations: dict[str, str] | None = None,
) -> Attached:
    """Push `content` (a document: bytes or a file) as a referrer of `subject`; idempotent (the manifest is
    canonical JSON: the same document gives the same referrer, listed once)."""
    if isinstance(content, Path):
        size = content.stat().st_size
        with open(content, "rb") as f:
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        body: Body = content
    else:
        size, digest, body = len(content), "sha256:" + hashlib.sha256(content).hexdigest(), content
    repo.ensure_blob(EMPTY_DIGEST, len(EMPTY), EMPTY, "empty config")
    repo.ensure_blob(digest, size, body, title)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY)},
        "layers": [{"mediaType": media_type, "digest": digest, "size": size, "annotations": {TITLE: title}}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    }
    if annotations:
        manifest["annotations"] = annotations
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    ref_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    resp = repo.send("PUT", f"{repo.base}/manifests/{ref_digest}", {"Content-Type": OCI_MANIFEST}, raw)
    if resp.status_code != 201:
        raise repo.failure(resp, f"upload of the {artifact_type} referrer")
    if resp.headers.get("OCI-Subject") == subject.digest:
        return Attached(ref_digest, API)
    entry: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": ref_digest,
        "size": len(raw),
        "artifactType": artifact_type,
    }
    if annotations:
        entry["annotations"] = annotations
    _add_to_index(repo, subject.digest, entry)
    return Attached(ref_digest, TAG_SCHEMA)


def schema_tag(repo: Repository, digest: str) -> str:
    """The referrers tag schema's tag for the sha256 `digest`: `sha256-<hex>`."""
    with repo.own_errors():
        return "sha256-" + check_digest(digest, f"{repo.what} subject")


def _add_to_index(repo: Repository, subject: str, entry: dict[str, Any]) -> None:
    tag = schema_tag(repo, subject)
    for _ in range(TAG_TRIES):
        listed = _tag_index(repo, tag)
        if any(m.get("digest") == entry["digest"] for m in listed):
            return
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*listed, entry]}
        raw = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
        resp = repo.send("PUT", f"{repo.base}/manifests/{tag}", {"Content-Type": OCI_INDEX}, raw)
        if resp.status_code != 201:
            raise repo.failure(resp, f"update of the referrers index {tag}")
        if any(m.get("digest") == entry["digest"] for m in _tag_index(repo, tag)):
            return
    raise repo.error(f"{repo.what}: the referrers index {tag} kept changing under us; push again")


def _tag_index(repo: Repository, tag: str) -> list[dict[str, Any]]:
    """The `manifests` of the referrers index tagged `tag` ([] when there is none); an index that is not one
    (another media type, malformed entries) is refused, never overwritten."""
    try:
        raw = _get(repo, f"{repo.base}/manifests/{tag}", f"referrers index {tag}", {"Accept": ACCEPT})
    except _Absent:
        return []
    return _manifests(repo, raw, f"referrers index {tag}")


def _get(repo: Repository, url: str | httpx.URL, what: str, headers: dict[str, str]) -> bytes:
    def failure(resp: httpx.Response) -> Exception:
        return _Absent() if resp.status_code == 404 else repo.failure(resp, what)

    return repo.fetch(url, what, MANIFEST_LIMIT, failure, headers)[0]


def _manifests(repo: Repository, raw: bytes, what: str) -> list[dict[str, Any]]:
    with repo.own_errors():
        doc = load_json(raw, f"{repo.what} {what}")
    entries = doc.get("manifests")
    if doc.get("mediaType") != OCI_INDEX or not isinstance(entries, list):
        raise repo.error(f"{repo.what}: {what} is not an OCI image index")
    for m in entries:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("digest"), str)
            or not isinstance(m.get("size"), int)
        ):
            raise repo.error(f"{repo.what}: {what} has a malformed entry")
    return entries


def list_referrers(repo: Repository, digest: str, artifact_type: str | None = None) -> list[Referrer]:
    """The referrers of the manifest `digest` (of `artifact_type` only, when given), from the referrers API,
    else from the tag schema's index; [] when there are none."""
    tag = schema_tag(repo, digest)
    url = httpx.URL(f"{repo.base}/referrers/{digest}")
    if artifact_type:
        url = url.copy_merge_params({"artifactType": artifact_type})
    try:
        raw = _get(repo, url, "referrers list", {"Accept": OCI_INDEX})
        what = "referrers list"
    except _Absent:
        try:
            raw = _get(repo, f"{repo.base}/manifests/{tag}", f"referrers index {tag}", {"Accept": ACCEPT})
        except _Absent:
            return []
        what = f"referrers index {tag}"
    found = []
    for m in _manifests(repo, raw, what):
        kind = m.get("artifactType")
        if not isinstance(kind, str) or (artifact_type and kind != artifact_type):
            continue
        notes = m.get("annotations")
        found.append(Referrer(m["digest"], m["size"], kind, notes if isinstance(notes, dict) else {}))
    return found


def fetch_one(repo: Repository, ref: Referrer, subject: str, artifact_type: str, limit: int) -> bytes:
    """The one layer of the referrer `ref` (its manifest and the layer verified against their digests), after
    checking that the manifest's subject is `subject` and its artifactType `artifact_type`; at most `limit`
    bytes."""
    what = f"referrer {ref.digest[:19]}"
    with repo.own_errors():
        check_digest(ref.digest, what)
        raw, _ = repo._manifest(ref.digest, ref.digest)
        doc = load_json(raw, f"{repo.what} {what}")
    named = doc.get("subject")
    about = named.get("digest") if isinstance(named, dict) else None
    if about != subject:
        raise repo.error(f"{repo.what}: {what} is about another manifest ({str(about)[:19]})")
    layers = doc.get("layers")
    if doc.get("artifactType") != artifact_type or not isinstance(layers, list) or len(layers) != 1:
        raise repo.error(f"{repo.what}: {what} is not one {artifact_type} document")
    layer = layers[0]
    try:
        desc = Descriptor(str(layer["mediaType"]), str(layer["digest"]), int(layer["size"]))
        check_digest(desc.digest, what)
    except (KeyError, TypeError, ValueError, SourceError):
        raise repo.error(f"{repo.what}: {what} has a malformed layer") from None
    if desc.size > limit or desc.size < 0:
        raise repo.error(f"{repo.what}: {what}'s document is larger than {limit} bytes")
    return repo.config(desc, f"{what} document")
