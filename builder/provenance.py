"""The build's provenance: `provenance.intoto.json`, an in-toto Statement v1 with a SLSA Provenance v1
predicate, written into the artifact last (https://in-toto.io/Statement/v1, https://slsa.dev/provenance/v1).

    _type          https://in-toto.io/Statement/v1
    subject        every other file of the artifact (manifest.json included), by name, with its sha256
    predicateType  https://slsa.dev/provenance/v1
    predicate.buildDefinition
        buildType             BUILD_TYPE
        externalParameters    the BuildInputs (builder/inputs.py), field for field: what `xbuild rebuild`
                              builds from, and whose sha256 is the artifact's build key
        internalParameters    {"buildKey": the key}
        resolvedDependencies  the source image (its manifest digest, named by its reference), the kernel
                              (the paired file's sha256; its cache key and fragments, or its --kernel
                              source), the init (the binary's sha256 and cache key), the recipe (its sha256)
    predicate.runDetails
        builder               {"id": BUILDER_ID, "version": {"xbuild": version}}
        metadata              invocationId = the build key; startedOn = finishedOn = SOURCE_DATE_EPOCH
                              (RFC 3339, UTC), left out when the build has none

Nothing in it depends on the machine, the time or the output path, so the same inputs give the same
bytes (and `xbuild rebuild` can compare this file like any other). The statement is written with the
standard library: it is plain JSON, and in-toto-attestation's protobuf Struct would turn its integers into
doubles; the tests validate it against that library's Statement v1 and Provenance v1 definitions.

`read` is the one reader: a provenance from a pulled artifact is untrusted (size-limited, every field
checked, BuildInputs.from_json for the parameters); errors are ArtifactError (one line, exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .artifact import NAMES, PROVENANCE, SHA256_HEX, _read
from .cache import file_sha256, no_space
from .errors import ArtifactError
from .inputs import BuildInputs

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:xbuild:build-type:artifact:v1"
BUILDER_ID = "urn:xbuild:builder"
LIMIT = 1 << 20  # a provenance larger than this is not read


@dataclass(frozen=True)
class Dependencies:
    """What the build resolved besides the source image: the sha256 of the paired kernel file and of the
    init binary."""

    init_sha256: str
    kernel_sha256: str | None = None


@dataclass(frozen=True)
class Provenance:
    """A read provenance: the recorded inputs and the subjects (file name → sha256)."""

    inputs: BuildInputs
    subjects: dict[str, str]


def _time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(oci_digest: str) -> dict[str, str]:
    """`sha256:hex` as an in-toto DigestSet."""
    algorithm, _, value = oci_digest.partition(":")
    return {algorithm: value}


def statement(directory: Path, inputs: BuildInputs, deps: Dependencies) -> dict[str, Any]:
    """The statement for the artifact being written in `directory` (every file but the provenance is
    there already)."""
    subjects = [
        {"name": name, "digest": {"sha256": file_sha256(directory / name)}}
        for name in sorted(NAMES)
        if name != PROVENANCE and (directory / name).is_file()
    ]
    resolved: list[dict[str, Any]] = [
        {
            "name": "image",
            "digest": _digest(inputs.source_digest),
            "annotations": {"reference": inputs.source_reference, "platform": inputs.platform},
        },
        {
            "name": "init",
            "digest": {"sha256": deps.init_sha256},
            "annotations": {"cacheKey": inputs.init_key},
        },
    ]
    if inputs.kernel and deps.kernel_sha256:
        k = inputs.kernel
        notes: dict[str, Any] = (
            {"cacheKey": k.key, "fragments": list(k.fragments or ())} if k.key else {"source": k.source}
        )
        resolved.append({"name": "kernel", "digest": {"sha256": deps.kernel_sha256}, "annotations": notes})
    if inputs.recipe and inputs.recipe_sha256:
        resolved.append(
            {
                "name": "recipe",
                "digest": {"sha256": inputs.recipe_sha256},
                "annotations": {"recipe": inputs.recipe},
            }
        )
    key = inputs.key()
    metadata: dict[str, Any] = {"invocationId": key}
    if inputs.source_date_epoch is not None:
        metadata |= {
            "startedOn": _time(inputs.source_date_epoch),
            "finishedOn": _time(inputs.source_date_epoch),
        }
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": inputs.to_json(),
                "internalParameters": {"buildKey": key},
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"xbuild": __version__}},
                "metadata": metadata,
            },
        },
    }


def write(directory: Path, inputs: BuildInputs, deps: Dependencies) -> None:
    """Write `directory`/provenance.intoto.json (last: it names every other file's sha256)."""
    raw = json.dumps(statement(directory, inputs, deps), indent=2, sort_keys=True) + "\n"
    with no_space(directory / PROVENANCE):
        (directory / PROVENANCE).write_text(raw)


def read(directory: Path) -> Provenance:
    """The provenance of the artifact `directory` (validated by open_artifact); ArtifactError when it has
    none or it is not one xbuild wrote."""
    path = directory / PROVENANCE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {PROVENANCE} (built by an xbuild without provenance?)")
    where = str(path)
    try:
        doc = json.loads(_read(path, LIMIT))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{where}: malformed ({str(e)[:80]})") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise ArtifactError(f"{where}: not an in-toto Statement v1")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise ArtifactError(f"{where}: predicateType is not {PREDICATE_TYPE}")
    definition = _object(
        _object(doc.get("predicate"), where, "predicate").get("buildDefinition"), where, "buildDefinition"
    )
    if definition.get("buildType") != BUILD_TYPE:
        raise ArtifactError(f"{where}: buildType {str(definition.get('buildType'))[:80]!r} is not xbuild's")
    try:
        inputs = BuildInputs.from_json(definition.get("externalParameters"), "externalParameters")
    except ArtifactError as e:
        raise ArtifactError(f"{where}: {e}") from None
    subjects: dict[str, str] = {}
    listed = doc.get("subject")
    if not isinstance(listed, list):
        raise ArtifactError(f"{where}: subject is not a list")
    for s in listed:
        s = _object(s, where, "subject")
        name, digest = s.get("name"), _object(s.get("digest"), where, "subject digest").get("sha256")
        if name not in NAMES or not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise ArtifactError(f"{where}: subject {str(name)[:80]!r} is not an artifact file with a sha256")
        subjects[name] = digest
    return Provenance(inputs, subjects)


def _object(value: object, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArtifactError(f"{where}: {what} is not a JSON object")
    return value
