"""OCI referrers against the real registry (Debian's docker-registry, distribution 2.8, which has no referrers
API): what it does with a manifest carrying `subject`, the tag schema's index kept read-modify-write, the
listing's fallback, and `xbuild push` attaching an artifact's SBOM/provenance documents."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from builder import publish
from builder.artifact import open_artifact
from builder.errors import PublishError
from builder.oci import referrers
from builder.oci.manifest import OCI_INDEX, OCI_MANIFEST
from builder.publish import Blob, target
from tests.fixtures.registry import Registry
from tests.test_publish import artifact, built  # noqa: F401  (the module-scoped artifact every test copies)

CDX = "application/vnd.cyclonedx+json"
INTOTO = "application/vnd.in-toto+json"


def _index(registry: Registry, repo: str, digest: str) -> httpx.Response:
    return httpx.get(f"{registry.url}/v2/{repo}/manifests/sha256-{digest[7:]}", headers={"Accept": OCI_INDEX})


def _repo(registry: Registry, repo: str, push: bool = True) -> publish.Repository:
    return publish._repository(target(f"{registry.host}/{repo}:x"), False, push)


def _push_bare(artifact: Path, ref: str) -> publish.Pushed:
    """Push the artifact without the SBOM/provenance files a build may write (so it has no referrers)."""
    config, layers, notes = publish.vm_blobs(open_artifact(artifact))
    layers = [b for b in layers if not publish.document_type(b.title or "")]
    return publish._push(target(ref), publish.VM, config, layers, notes, False, lambda msg: None)


def test_attach_without_referrers_api(artifact: Path, registry: Registry) -> None:
    pushed = _push_bare(artifact, f"{registry.host}/ref/a:v1")
    assert httpx.get(f"{registry.url}/v2/ref/a/referrers/{pushed.digest}").status_code == 404  # no API
    with _repo(registry, "ref/a") as repo:
        subject = referrers.subject_of(repo, "v1")
        assert subject.digest == pushed.digest and subject.media_type == OCI_MANIFEST
        sbom = b'{"bomFormat":"CycloneDX"}'
        one = referrers.attach(repo, subject, CDX, sbom, CDX, "sbom.cdx.json")
        assert one.how == referrers.TAG_SCHEMA
        again = referrers.attach(repo, subject, CDX, sbom, CDX, "sbom.cdx.json")  # idempotent
        assert again == one
        two = referrers.attach(repo, subject, INTOTO, b'{"_type":"x"}', INTOTO, "provenance.intoto.json")
        listed = referrers.list_referrers(repo, subject.digest)
        assert [(r.digest, r.artifact_type) for r in listed] == [(one.digest, CDX), (two.digest, INTOTO)]
        assert [r.digest for r in referrers.list_referrers(repo, subject.digest, INTOTO)] == [two.digest]
        assert referrers.fetch_one(repo, listed[0], subject.digest, CDX, 1 << 20) == sbom
        with pytest.raises(PublishError, match="about another manifest"):
            referrers.fetch_one(repo, listed[0], "sha256:" + "0" * 64, CDX, 1 << 20)
        with pytest.raises(PublishError, match="larger than 4 bytes"):
            referrers.fetch_one(repo, listed[0], subject.digest, CDX, 4)
        assert referrers.list_referrers(repo, "sha256:" + "1" * 64) == []
    # the registry kept the referrer as pushed, subject and all; the tag schema's index lists both
    stored = httpx.get(
        f"{registry.url}/v2/ref/a/manifests/{one.digest}", headers={"Accept": OCI_MANIFEST}
    ).json()
    assert stored["subject"]["digest"] == pushed.digest and stored["artifactType"] == CDX
    assert stored["config"]["digest"] == referrers.EMPTY_DIGEST
    index = _index(registry, "ref/a", pushed.digest).json()
    assert index["mediaType"] == OCI_INDEX and [m["digest"] for m in index["manifests"]] == [
        one.digest,
        two.digest,
    ]
    assert all(m["artifactType"] for m in index["manifests"])


def test_index_update_keeps_other_entries_and_refuses_a_foreign_tag(
    artifact: Path, registry: Registry
) -> None:
    pushed = _push_bare(artifact, f"{registry.host}/ref/b:v1")
    # another tool's referrer already in the index (as oras or cosign would leave it); distribution 2.8
    # refuses an index naming a manifest it does not hold, so that one is pushed first
    vm = httpx.get(f"{registry.url}/v2/ref/b/manifests/v1", headers={"Accept": OCI_MANIFEST}).json()
    theirs = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": vm["config"], "layers": []})
    their_digest = "sha256:" + hashlib.sha256(theirs.encode()).hexdigest()
    put = httpx.put(
        f"{registry.url}/v2/ref/b/manifests/{their_digest}",
        content=theirs,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert put.status_code == 201, put.text
    other = {"mediaType": OCI_MANIFEST, "digest": their_digest, "size": len(theirs), "artifactType": "x/y"}
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [other]}).encode()
    tag = f"sha256-{pushed.digest[7:]}"
    put = httpx.put(
        f"{registry.url}/v2/ref/b/manifests/{tag}", content=raw, headers={"Content-Type": OCI_INDEX}
    )
    assert put.status_code == 201
    with _repo(registry, "ref/b") as repo:
        subject = referrers.subject_of(repo, pushed.digest)
        mine = referrers.attach(repo, subject, CDX, b"{}", CDX, "sbom.cdx.json")
    index = _index(registry, "ref/b", pushed.digest).json()
    assert [m["digest"] for m in index["manifests"]] == [other["digest"], mine.digest]
    # a tag of that name that is not an index (here: the VM image itself) is refused, never overwritten
    _push_bare(artifact, f"{registry.host}/ref/c:v1")
    raw_vm = httpx.get(f"{registry.url}/v2/ref/c/manifests/v1", headers={"Accept": OCI_MANIFEST}).content
    put = httpx.put(
        f"{registry.url}/v2/ref/c/manifests/{tag}", content=raw_vm, headers={"Content-Type": OCI_MANIFEST}
    )
    assert put.status_code == 201, put.text
    with _repo(registry, "ref/c") as repo:
        subject = referrers.Subject(OCI_MANIFEST, pushed.digest, len(raw_vm))
        with pytest.raises(PublishError, match="is not an OCI image index"):
            referrers.attach(repo, subject, CDX, b"{}", CDX, "sbom.cdx.json")
        with pytest.raises(PublishError, match="is not an OCI image index"):
            referrers.list_referrers(repo, pushed.digest)
    head = httpx.head(f"{registry.url}/v2/ref/c/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    assert head.headers["Docker-Content-Digest"] == pushed.digest


def test_push_attaches_documents(artifact: Path, registry: Registry, tmp_path: Path) -> None:
    """`_push` (what `xbuild push` does after reading the directory) attaches every sbom.*.json /
    provenance.*.json layer; a document of an unknown format stays a layer only."""
    config, layers, notes = publish.vm_blobs(open_artifact(artifact))
    layers = [b for b in layers if not publish.document_type(b.title or "")]  # the build's own, if any
    docs = {
        "sbom.cdx.json": b'{"bomFormat":"CycloneDX","specVersion":"1.6"}',
        "provenance.intoto.json": b'{"_type":"https://in-toto.io/Statement/v1"}',
        "sbom.other.json": b"{}",
    }
    for name, body in docs.items():
        (tmp_path / name).write_bytes(body)
    layers += [Blob.of(tmp_path / name, publish.VM_OTHER_FILE, name) for name in docs]
    ref = target(f"{registry.host}/ref/docs:v1")
    pushed = publish._push(ref, publish.VM, config, layers, notes, False, lambda msg: None)
    assert pushed.referrers is not None and set(pushed.referrers) == {
        "sbom.cdx.json",
        "provenance.intoto.json",
    }
    with _repo(registry, "ref/docs") as repo:
        listed = referrers.list_referrers(repo, pushed.digest)
        got = {
            r.artifact_type: referrers.fetch_one(repo, r, pushed.digest, r.artifact_type, 1 << 20)
            for r in listed
        }
    assert got == {CDX: docs["sbom.cdx.json"], INTOTO: docs["provenance.intoto.json"]}
    # pushing again changes nothing: same referrers, listed once
    again = publish._push(ref, publish.VM, config, layers, notes, False, lambda msg: None)
    assert again.referrers == pushed.referrers
    assert len(_index(registry, "ref/docs", pushed.digest).json()["manifests"]) == 2


def test_push_attaches_the_builds_documents(artifact: Path, registry: Registry) -> None:
    """Through the artifact format: the SBOM and provenance files a build writes are attached by `push`."""
    names = sorted(p.name for p in artifact.iterdir() if publish.document_type(p.name))
    if not names:
        pytest.skip("this build writes no sbom.*.json / provenance.*.json yet")
    pushed = publish.push(artifact, f"{registry.host}/ref/cli:v1")
    assert pushed.referrers is not None and sorted(pushed.referrers) == names
    index = _index(registry, "ref/cli", pushed.digest).json()
    assert sorted(m["artifactType"] for m in index["manifests"]) == sorted(
        str(publish.document_type(n)) for n in names
    )
    with _repo(registry, "ref/cli", push=False) as repo:
        for r in referrers.list_referrers(repo, pushed.digest):
            name = next(n for n in names if publish.document_type(n) == r.artifact_type)
            assert (
                referrers.fetch_one(repo, r, pushed.digest, r.artifact_type, 64 << 20)
                == (artifact / name).read_bytes()
            )


def test_document_types() -> None:
    assert publish.document_type("sbom.cdx.json") == CDX
    assert publish.document_type("sbom.spdx.json") == "application/spdx+json"
    assert publish.document_type("provenance.intoto.json") == INTOTO
    for name in ("manifest.json", "sbom.json", "sbom.cdx.xml", "x.cdx.json", "sbom.unknown.json"):
        assert publish.document_type(name) is None
