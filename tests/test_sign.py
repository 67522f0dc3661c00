"""Signatures of VM images: made by xbuild, checked by an independent verifier (sigstore-js' @sigstore/verify,
Sigstore's own JavaScript libraries, run by node), and enforced by `xbuild verify`, `pull --verify-key` and
`run --verify-key` against the real registry, hostile cases through the real CLI in a sandbox."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from builder import publish, sign
from builder.errors import SignatureError
from builder.oci import referrers
from builder.oci.manifest import ACCEPT, OCI_MANIFEST
from builder.publish import target
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import fixtures_dir
from tests.fixtures.registry import Registry
from tests.test_publish import artifact, built  # noqa: F401  (the module-scoped artifact every test copies)

JS = Path(__file__).parent / "fixtures" / "sigstore-js"


@dataclasses.dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


def _keys(directory: Path, kind: str) -> Keys:
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa" else ed25519.Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{kind}.key", directory / f"{kind}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Keys(private, public)


@pytest.fixture(scope="session")
def sigstore_js() -> Path:
    """tests/fixtures/sigstore-js installed (`npm ci`, the lock file's exact versions) once per lock file
    under $XBUILD_FIXTURES; the directory holding verify.js and its node_modules."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.fail("node and npm are needed for the interoperability test (make apt installs them)")
    files = ("package.json", "package-lock.json", "verify.js")
    stamp = hashlib.sha256(b"".join((JS / f).read_bytes() for f in files)).hexdigest()[:12]
    where = fixtures_dir() / f"sigstore-js-{stamp}"
    if not (where / "node_modules" / "@sigstore" / "verify").is_dir():
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy(JS / f, tmp / f)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=tmp, check=True, capture_output=True)
        shutil.rmtree(where, ignore_errors=True)
        tmp.rename(where)
    return where


def _bundles_of(registry: Registry, repo: str, digest: str) -> list[bytes]:
    """The signature bundles attached to `digest`, read with plain HTTP as any registry client would: the
    referrers tag schema's index, each listed manifest, its one layer."""
    index = httpx.get(f"{registry.url}/v2/{repo}/manifests/sha256-{digest[7:]}", headers={"Accept": ACCEPT})
    index.raise_for_status()
    found = []
    for entry in index.json()["manifests"]:
        if entry["artifactType"] != sign.BUNDLE_TYPE:
            continue
        manifest = httpx.get(
            f"{registry.url}/v2/{repo}/manifests/{entry['digest']}", headers={"Accept": OCI_MANIFEST}
        ).json()
        assert manifest["subject"]["digest"] == digest
        found.append(httpx.get(f"{registry.url}/v2/{repo}/blobs/{manifest['layers'][0]['digest']}").content)
    return found


def _node_verify(
    js: Path, bundle: bytes, public: Path, digest: str, work: Path
) -> subprocess.CompletedProcess[str]:
    path = work / f"bundle-{hashlib.sha256(bundle).hexdigest()[:12]}.json"
    path.write_bytes(bundle)
    return subprocess.run(
        ["node", str(js / "verify.js"), str(path), str(public), digest.removeprefix("sha256:")],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("kind", ["ecdsa", "ed25519"])
def test_signature_verifies_with_sigstore_js(
    kind: str, artifact: Path, registry: Registry, tmp_path: Path, sandbox: Sandbox, sigstore_js: Path
) -> None:
    """`xbuild push --sign` makes a signature Sigstore's own verifier accepts with the public key, and only
    with that key and for that digest."""
    keys, other = _keys(tmp_path / "k", kind), _keys(tmp_path / "other", kind)
    ref = f"{registry.host}/signed/{kind}:v1"
    r = sandbox.xbuild("push", str(artifact), ref, "--sign", str(keys.private))
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip().rsplit("@", 1)[1]
    assert "signed " in r.stderr and f"{ref}@{digest}" == r.stdout.strip()
    (bundle,) = _bundles_of(registry, f"signed/{kind}", digest)
    assert json.loads(bundle)["mediaType"] == sign.BUNDLE_TYPE
    good = _node_verify(sigstore_js, bundle, keys.public, digest, tmp_path)
    assert good.returncode == 0 and good.stdout.strip() == "verified", good.stdout + good.stderr
    wrong_key = _node_verify(sigstore_js, bundle, other.public, digest, tmp_path)
    assert wrong_key.returncode == 1 and "signature verification failed" in wrong_key.stdout
    wrong_digest = _node_verify(sigstore_js, bundle, keys.public, "sha256:" + "0" * 64, tmp_path)
    assert wrong_digest.returncode == 1 and "statement is about" in wrong_digest.stdout
    # and xbuild's own check agrees, from the CLI
    r = sandbox.xbuild("verify", ref, "--key", str(keys.public))
    assert r.returncode == 0 and r.stdout.strip() == f"{ref}@{digest}", r.stderr


def test_sign_existing_image_and_pull_verified(
    artifact: Path, registry: Registry, tmp_path: Path, sandbox: Sandbox, xbuild_cache: Path
) -> None:
    """`xbuild sign REF` signs what is already in the registry; `pull --verify-key` then pulls exactly the
    digest it verified, even after the tag moves to an unsigned image."""
    keys = _keys(tmp_path / "k", "ecdsa")
    ref = f"{registry.host}/signed/later:v1"
    pushed = publish.push(artifact, ref)
    r = sandbox.xbuild("sign", ref, "--key", str(keys.private))
    assert r.returncode == 0 and r.stdout.strip() == f"{registry.host}/signed/later@{pushed.digest}", r.stderr
    assert sign.verify(target(ref), [keys.public]) == pushed.digest
    out = sandbox.root / "work" / "out"
    r = sandbox.xbuild("pull", ref, "-o", str(out), "--verify-key", str(keys.public))
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    assert (out / "manifest.json").read_bytes() == (artifact / "manifest.json").read_bytes()
    # a second signer's signature beside the first: either verifies with its own key
    second = _keys(tmp_path / "k2", "ed25519")
    sign.sign(target(ref), second.private)
    assert (
        sign.verify(target(ref), [second.public]) == sign.verify(target(ref), [keys.public]) == pushed.digest
    )


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    needle: str


ATTACKS = [
    Attack("unsigned", "not signed (no signature is attached to"),
    Attack("wrong-key", "does not verify with this key"),
    Attack("tampered-payload", "does not verify with this key"),
    Attack("other-digest", "signed for another digest"),
    Attack("not-a-bundle", "not a Sigstore bundle"),
]


def _stage(attack: str, registry: Registry, artifact: Path, keys: Keys, other: Keys) -> str:
    """Push the artifact to a repository of its own and attach what `attack` needs; its reference."""
    ref = target(f"{registry.host}/hostile/{attack}:v1")
    pushed = publish.push(artifact, ref)
    key = sign.load_private_key(keys.private)
    if attack == "unsigned":
        return str(ref.docker_name)
    if attack == "wrong-key":
        sign.sign(ref, other.private)
        return str(ref.docker_name)
    if attack == "tampered-payload":
        doc = json.loads(sign.make_bundle(key, pushed.digest, "hostile"))
        statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
        statement["predicate"] = {"note": "changed after signing"}
        doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        bundle = json.dumps(doc).encode()
    elif attack == "other-digest":  # a genuine signature by the right key, of another image
        bundle = sign.make_bundle(key, "sha256:" + hashlib.sha256(b"another image").hexdigest(), "hostile")
    else:
        bundle = b'{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json"}'
    with publish._repository(ref, False, push=True) as repo:
        subject = referrers.subject_of(repo, pushed.digest)
        referrers.attach(repo, subject, sign.BUNDLE_TYPE, bundle, sign.BUNDLE_TYPE, "forged.sigstore.json")
    return str(ref.docker_name)


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_verified_pull_refuses(
    attack: Attack, artifact: Path, registry: Registry, tmp_path: Path, sandbox: Sandbox, xbuild_cache: Path
) -> None:
    keys, other = _keys(tmp_path / "k", "ecdsa"), _keys(tmp_path / "other", "ecdsa")
    ref = _stage(attack.name, registry, artifact, keys, other)
    out = sandbox.root / "work" / "out"
    for args in (
        ("pull", ref, "-o", str(out), "--verify-key", str(keys.public)),
        ("verify", ref, "--key", str(keys.public)),
    ):
        before = sandbox.snapshot()
        assert_refused(sandbox.xbuild(*args), 2, attack.needle, ref)
        assert sandbox.changes(before) == []
        assert sandbox.stale_temps() == []
    with pytest.raises(SignatureError, match=attack.needle.replace("(", r"\(")):
        sign.verify(target(ref), [keys.public])


def test_verified_run_refuses(
    artifact: Path, registry: Registry, tmp_path: Path, sandbox: Sandbox, xbuild_cache: Path
) -> None:
    """`run REF --verify-key` refuses before pulling or booting anything, and a directory outright."""
    keys, other = _keys(tmp_path / "k", "ed25519"), _keys(tmp_path / "other", "ed25519")
    ref = _stage("wrong-key", registry, artifact, keys, other)
    before = sandbox.snapshot()
    assert_refused(sandbox.xbuild("run", ref, "--verify-key", str(keys.public)), 2, "no signature verifies")
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []
    assert not (sandbox.cache / "pulled").exists()
    r = sandbox.xbuild("run", str(artifact), "--verify-key", str(keys.public))
    assert_refused(r, 2, "signatures are checked on a VM image in a registry, not a directory")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a key", "not a PEM public key"),
        (
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "unsupported key type",
        ),
    ],
    ids=["garbage", "p384"],
)
def test_bad_keys_refused(
    content: bytes, needle: str, artifact: Path, registry: Registry, tmp_path: Path, sandbox: Sandbox
) -> None:
    pub = tmp_path / "key.pub"
    pub.write_bytes(content)
    ref = f"{registry.host}/hostile/badkey:v1"
    before = sandbox.snapshot()
    assert_refused(sandbox.xbuild("verify", ref, "--key", str(pub)), 2, needle)
    # --sign with a public key (or anything but a private key) is refused before anything is pushed
    assert_refused(sandbox.xbuild("push", str(artifact), ref, "--sign", str(pub)), 2, "not a PEM private key")
    assert sandbox.changes(before) == []
    assert httpx.get(f"{registry.url}/v2/hostile/badkey/tags/list").status_code == 404


def test_encrypted_private_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    with pytest.raises(SignatureError, match="XBUILD_KEY_PASSWORD"):
        sign.load_private_key(path)
    monkeypatch.setenv(sign.PASSWORD_ENV, "wrong")
    with pytest.raises(SignatureError, match="password"):
        sign.load_private_key(path)
    monkeypatch.setenv(sign.PASSWORD_ENV, "s3cret")
    digest = "sha256:" + "a" * 64
    sign.check_bundle(sign.make_bundle(sign.load_private_key(path), digest, "x"), key.public_key(), digest)


def test_verify_policy(
    artifact: Path, registry: Registry, tmp_path: Path, sandbox: Sandbox, xbuild_cache: Path
) -> None:
    """`--verify-policy`: the first rule matching registry/repository decides (keys, any of which may
    verify, or an explicit unsigned); no matching rule, an unsigned image under a keys rule, a malformed
    policy: refused, exit 2, nothing written."""
    keys = _keys(tmp_path / "k", "ecdsa")
    _keys(tmp_path / "other", "ed25519")  # a second key the policy lists (signs nothing here)
    signed = f"{registry.host}/policy/signed:v1"
    publish.push(artifact, signed)
    sign.sign(target(signed), keys.private)
    unsigned = f"{registry.host}/policy/signed-not:v1"
    publish.push(artifact, unsigned)
    open_ref = f"{registry.host}/policy/open:v1"
    publish.push(artifact, open_ref)
    elsewhere = f"{registry.host}/elsewhere/app:v1"
    publish.push(artifact, elsewhere)
    policy = tmp_path / "k" / "policy.json"
    rules = [
        {"match": f"{registry.host}/policy/open", "unsigned": True},
        {"match": f"{registry.host}/policy/*", "keys": ["../other/ed25519.pub", "ecdsa.pub"]},
    ]
    policy.write_text(json.dumps({"rules": rules}))
    for n, ref in enumerate((signed, open_ref)):
        out = sandbox.root / "work" / f"ok-{n}"
        r = sandbox.xbuild("pull", ref, "-o", str(out), "--verify-policy", str(policy))
        assert r.returncode == 0 and (out / "manifest.json").is_file(), r.stderr
    assert (
        "is signed (ed25519.pub, ecdsa.pub)"
        in sandbox.xbuild(
            "pull", signed, "-o", str(sandbox.root / "work" / "ok-0"), "--verify-policy", str(policy)
        ).stderr
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"match": "*", "keys": ["a.pub"], "unsigned": True}]}))
    out = sandbox.root / "work" / "out"
    for ref, pol, needle in (
        (unsigned, policy, "not signed"),
        (elsewhere, policy, "no rule of the policy"),
        (signed, bad, "rule 1: give either keys or"),
    ):
        for cmd in (("pull", ref, "-o", str(out)), ("run", ref)):
            before = sandbox.snapshot()
            assert_refused(sandbox.xbuild(*cmd, "--verify-policy", str(pol)), 2, needle)
            assert sandbox.changes(before) == []
    both = sandbox.xbuild(
        "pull", signed, "-o", str(out), "--verify-policy", str(policy), "--verify-key", str(keys.public)
    )
    assert_refused(both, 2, "exclude each other")
