"""provenance.intoto.json (builder/provenance.py): written by the real build, checked against the in-toto
Statement v1 and SLSA Provenance v1 definitions (in-toto-attestation's protobufs, unknown fields refused),
reproducible, and read back safely."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

from builder import provenance
from builder.artifact import MANIFEST, NAMES, PROVENANCE, open_artifact
from builder.build import BuildOptions, build
from builder.errors import ArtifactError
from builder.inputs import BuildInputs
from tests.fixtures.images import make_busybox_image

EPOCH = 1_700_000_000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The busybox image built with the (warm) default kernel: (artifact, image ref)."""
    work = tmp_path_factory.mktemp("prov")
    image = make_busybox_image(work / "oci")
    out = work / "art"
    build(image.ref, BuildOptions(output=out, epoch=EPOCH))
    return out, image.ref


def _doc(art: Path) -> dict[str, Any]:
    return json.loads((art / PROVENANCE).read_text())


def test_statement_is_in_toto_v1_with_slsa_provenance_v1(built: tuple[Path, str]) -> None:
    art, _ = built
    raw = (art / PROVENANCE).read_text()
    stmt = Statement.copy_from_pb(json_format.Parse(raw, statement_pb2.Statement()))
    stmt.validate()  # _type, subjects with digests, predicateType, predicate
    assert stmt.pb.type == "https://in-toto.io/Statement/v1"
    assert stmt.pb.predicate_type == "https://slsa.dev/provenance/v1"
    for s in stmt.pb.subject:
        ResourceDescriptor.copy_from_pb(s).validate()
    doc = json.loads(raw)
    # the predicate is a SLSA v1 Provenance: every field a known one of the right type
    pred = json_format.ParseDict(doc["predicate"], provenance_pb2.Provenance(), ignore_unknown_fields=False)
    assert pred.build_definition.build_type == provenance.BUILD_TYPE
    assert pred.run_details.builder.id == provenance.BUILDER_ID
    assert (
        pred.run_details.metadata.started_on.seconds == EPOCH == pred.run_details.metadata.finished_on.seconds
    )
    for dep in pred.build_definition.resolved_dependencies:
        ResourceDescriptor.copy_from_pb(dep).validate()


def test_subjects_are_the_artifact_files(built: tuple[Path, str]) -> None:
    art, _ = built
    doc = _doc(art)
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in art.iterdir() if p.name != PROVENANCE
    }
    assert {s["name"]: s["digest"]["sha256"] for s in doc["subject"]} == files
    assert set(files) >= {MANIFEST, "initrd.img", "kernel", "cmdline", "xen.cfg"}
    m = open_artifact(art).manifest  # the manifest lists it; open_artifact requires it
    assert m.provenance == PROVENANCE and PROVENANCE in m.files()


def test_parameters_and_dependencies(built: tuple[Path, str]) -> None:
    art, ref = built
    m = open_artifact(art).manifest
    read = provenance.read(art)
    inputs = read.inputs
    assert inputs.source_digest == m.source.manifest_digest and inputs.source_reference == m.source.reference
    assert inputs.source_date_epoch == EPOCH and inputs.memory_mb == m.guest.memory_mb
    assert m.kernel is not None and inputs.kernel is not None and inputs.kernel.key == m.kernel.key
    deps = {d["name"]: d for d in _doc(art)["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert deps["image"]["digest"] == {"sha256": m.source.manifest_digest.split(":")[1]}
    assert deps["kernel"]["digest"]["sha256"] == hashlib.sha256((art / "kernel").read_bytes()).hexdigest()
    assert deps["kernel"]["annotations"] == {
        "cacheKey": m.kernel.key,
        "fragments": list(m.kernel.fragments or ()),
    }
    assert deps["init"]["annotations"]["cacheKey"] == inputs.init_key
    assert _doc(art)["predicate"]["buildDefinition"]["internalParameters"] == {"buildKey": inputs.key()}


def test_same_inputs_same_bytes(built: tuple[Path, str], tmp_path: Path) -> None:
    art, ref = built
    again = tmp_path / "again"
    build(ref, BuildOptions(output=again, epoch=EPOCH))
    assert (again / PROVENANCE).read_bytes() == (art / PROVENANCE).read_bytes()
    other = tmp_path / "other"
    build(ref, BuildOptions(output=other, epoch=EPOCH, memory_mb=64))
    assert provenance.read(other).inputs.key() != provenance.read(art).inputs.key()


def _tampered(art: Path, tmp_path: Path, change: Any) -> Path:
    copy = Path(shutil.copytree(art, tmp_path / "copy"))
    doc = _doc(copy)
    raw = change(doc)
    (copy / PROVENANCE).write_bytes(raw if isinstance(raw, bytes) else json.dumps(doc).encode())
    return copy


def _ext(doc: dict[str, Any]) -> dict[str, Any]:
    ext: dict[str, Any] = doc["predicate"]["buildDefinition"]["externalParameters"]
    return ext


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: b"{not json", "malformed"),
        (lambda d: b"[]", "not an in-toto Statement v1"),
        (lambda d: d.update({"_type": "https://in-toto.io/Statement/v0.1"}), "not an in-toto Statement v1"),
        (lambda d: d.update({"predicateType": "https://slsa.dev/provenance/v0.2"}), "predicateType"),
        (lambda d: d["predicate"]["buildDefinition"].update({"buildType": "https://x"}), "buildType"),
        (lambda d: d["predicate"].update({"buildDefinition": []}), "buildDefinition is not a JSON object"),
        (lambda d: _ext(d).pop("source_digest"), "externalParameters: no source_digest"),
        (lambda d: _ext(d).update({"memory_mb": "64"}), "externalParameters.memory_mb: expected int"),
        (lambda d: _ext(d).update({"minimize": "all"}), "minimize: 'all' is not one of"),
        (lambda d: _ext(d).update({"schema": "xbuild.inputs.v9"}), "schema"),
        (lambda d: d["subject"][0].update({"name": "../../etc/passwd"}), "is not an artifact file"),
        (lambda d: d["subject"][0].update({"digest": {"sha256": "0" * 63}}), "is not an artifact file"),
        (lambda d: d.update({"subject": {}}), "subject is not a list"),
        (lambda d: b"[" * 100_000 + b"]" * 100_000, "malformed"),
        (lambda d: b" " * (provenance.LIMIT + 1), "larger than"),
    ],
)
def test_read_refuses_what_xbuild_did_not_write(
    built: tuple[Path, str], tmp_path: Path, change: Any, needle: str
) -> None:
    copy = _tampered(built[0], tmp_path, change)
    with pytest.raises(ArtifactError, match="provenance.intoto.json: ") as e:
        provenance.read(copy)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_no_provenance_and_manifest_checks(built: tuple[Path, str], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built[0], tmp_path / "copy"))
    (copy / PROVENANCE).unlink()
    with pytest.raises(ArtifactError, match="missing provenance.intoto.json"):
        open_artifact(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["provenance"]  # an artifact of an xbuild before provenance: valid, but nothing to rebuild
    (copy / MANIFEST).write_text(json.dumps(manifest))
    open_artifact(copy)
    with pytest.raises(ArtifactError, match="no provenance.intoto.json"):
        provenance.read(copy)
    manifest["provenance"] = "../provenance.json"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="provenance: '../provenance.json' is not the artifact's"):
        open_artifact(copy)
    assert PROVENANCE in NAMES


def test_inputs_round_trip_through_the_statement(built: tuple[Path, str]) -> None:
    """externalParameters is the BuildInputs, field for field (one record, three uses)."""
    art, _ = built
    inputs = provenance.read(art).inputs
    assert _ext(_doc(art)) == inputs.to_json()
    assert BuildInputs.from_json(_ext(_doc(art))) == inputs
