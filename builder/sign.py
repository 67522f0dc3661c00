"""Key-based signatures of VM images in a registry: Sigstore bundles (v0.3) attached as OCI referrers, the
layout cosign 3 uses for container signatures (cosign's specs/BUNDLE_SPEC.md), verifiable offline by any
Sigstore client given the public key (tests/test_sign.py checks ours with sigstore-js' @sigstore/verify).

What is signed is an in-toto statement (v1) whose one subject is the signed manifest's digest, predicate type
SIGN_PREDICATE, empty predicate, wrapped in a DSSE envelope (payload type application/vnd.in-toto+json; the
signature covers DSSE's pre-authentication encoding of type and payload). The bundle carries no certificate,
transparency-log entry or timestamp: its verification material is the key's hint (KEY_HINT of the public
key), the trust is the public key the verifier is given. Keys are PEM files, ECDSA P-256 (signatures ASN.1
DER, SHA-256) or Ed25519; a private key may be encrypted, its password in $XBUILD_KEY_PASSWORD.

`sign(ref, key)` attaches a bundle to the manifest `ref` names; `verify(ref, pubs)` returns the manifest
digest once a bundle attached to it verifies with one of `pubs` and names exactly that digest, else
SignatureError (exit 2) saying why: no signature, or each bundle's failure (wrong key, bad signature,
another digest...). `by_policy` applies a policy file: which keys, per repository pattern.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .errors import PublishError, SignatureError
from .oci import referrers
from .options import Say
from .publish import _repository as repository
from .reference import ImageRef

BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"  # what cosign 3 signs for `cosign sign`
CONTENT = "dev.sigstore.bundle.content"
PREDICATE = "dev.sigstore.bundle.predicateType"
BUNDLE_LIMIT = 1 << 20  # a bundle is ~1.5 KB; larger ones are refused unread
MAX_SIGNATURES = 32  # bundles checked per image at most (a registry may list any number)
PASSWORD_ENV = "XBUILD_KEY_PASSWORD"
POLICY_LIMIT = 1 << 20

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class Signed:
    """A signature attached: the signed manifest's digest and the referrer manifest holding the bundle."""

    subject: str
    referrer: str
    how: str  # referrers.Attached.how: "referrers API" or "tag schema"


def load_private_key(path: Path) -> PrivateKey:
    """The ECDSA P-256 or Ed25519 private key in the PEM file `path`; SignatureError otherwise."""
    data = _read_key(path)
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError as e:  # encrypted without a password, or a password for a plain key
        raise SignatureError(
            f"{path}: {e} (the password of an encrypted key goes in ${PASSWORD_ENV})"
        ) from None
    except ValueError:
        raise SignatureError(
            f"{path}: not a PEM private key (or the password in ${PASSWORD_ENV} is wrong)"
        ) from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise SignatureError(f"{path}: unsupported key type (use ECDSA P-256 or Ed25519)")


def load_public_key(path: Path) -> PublicKey:
    """The ECDSA P-256 or Ed25519 public key in the PEM file `path`; SignatureError otherwise."""
    data = _read_key(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"{path}: not a PEM public key") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise SignatureError(f"{path}: unsupported key type (use ECDSA P-256 or Ed25519)")


def _read_key(path: Path) -> bytes:
    try:
        if path.stat().st_size > 64 << 10:
            raise SignatureError(f"{path}: too large for a PEM key")
        return path.read_bytes()
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the key: {e.strerror}") from None


def key_hint(public: PublicKey) -> str:
    """The key's hint in a bundle: base64 of the sha256 of its DER SubjectPublicKeyInfo."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(digest: str, name: str) -> bytes:
    """The in-toto statement a signature of the manifest `digest` (of repository `name`) signs."""
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": SIGN_PREDICATE,
        "predicate": {},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def make_bundle(key: PrivateKey, digest: str, name: str) -> bytes:
    """A Sigstore bundle signing the manifest `digest` with `key` (canonical JSON)."""
    payload = statement(digest, name)
    message = pae(INTOTO_PAYLOAD, payload)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(message)
    else:
        sig = key.sign(message, ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_hint(key.public_key())},
            "tlogEntries": [],
            "timestampVerificationData": {"rfc3161Timestamps": []},
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": INTOTO_PAYLOAD,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode()


def check_bundle(raw: bytes, public: PublicKey, digest: str) -> None:
    """Nothing when the bundle `raw` is a signature by `public` of the manifest `digest`: a v0.3 bundle, one
    DSSE signature that verifies over the envelope's PAE, an in-toto statement whose subjects are exactly
    that digest. ValueError saying what is wrong otherwise (the caller names the bundle)."""
    try:
        bundle = json.loads(raw)
        env = bundle["dsseEnvelope"]
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
        payload_type = env["payloadType"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ValueError("not a Sigstore bundle with a DSSE envelope") from None
    if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_TYPE:
        raise ValueError(f"not a {BUNDLE_TYPE} bundle")
    if payload_type != INTOTO_PAYLOAD or not isinstance(sigs, list) or len(sigs) != 1:
        raise ValueError("not one signature over an in-toto statement")
    try:
        sig = base64.b64decode(sigs[0]["sig"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ValueError("malformed signature") from None
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(sig, pae(payload_type, payload))
        else:
            public.verify(sig, pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("signature does not verify with this key") from None
    try:
        doc = json.loads(payload)
        subjects = {s["digest"]["sha256"] for s in doc["subject"]}
        kind = doc["_type"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("signed payload is not an in-toto statement") from None
    if kind != STATEMENT_TYPE or subjects != {digest.removeprefix("sha256:")}:
        raise ValueError(f"signed for another digest ({', '.join(sorted(map(str, subjects)))[:80]})")


def sign(ref: ImageRef, key_path: Path, insecure: bool = False, log: Say = lambda msg: None) -> Signed:
    """Sign the manifest `ref` names (by tag or digest) with the key in `key_path`: a bundle attached to it
    as a referrer (artifactType BUNDLE_TYPE)."""
    key = load_private_key(key_path)
    with repository(ref, insecure, push=True) as repo:
        subject = referrers.subject_of(repo, str(ref.digest or ref.tag))
        digest = subject.digest
        raw = make_bundle(key, digest, str(ref.repository))
        attached = referrers.attach(
            repo,
            subject,
            BUNDLE_TYPE,
            raw,
            BUNDLE_TYPE,
            f"sha256-{hashlib.sha256(raw).hexdigest()}.sigstore.json",
            {CONTENT: "dsse-envelope", PREDICATE: SIGN_PREDICATE},
        )
    log(
        f"signed {ref.registry}/{ref.repository}@{digest} with {key_path.name} "
        f"(signature {attached.digest[:19]}, listed by the {attached.how})"
    )
    return Signed(digest, attached.digest, attached.how)


def verify(ref: ImageRef, keys: Sequence[Path], insecure: bool = False) -> str:
    """The digest of the manifest `ref` names once a signature attached to it verifies with one of the public
    keys in the files `keys`; SignatureError otherwise (no signature; none of those found verifies with any
    of the keys, each signature's reason)."""
    publics = [load_public_key(p) for p in keys]
    what = str(ref.docker_name)
    with repository(ref, insecure, push=False) as repo:
        digest = referrers.subject_of(repo, str(ref.digest or ref.tag)).digest
        found = referrers.list_referrers(repo, digest, BUNDLE_TYPE)
        if not found:
            raise SignatureError(f"{what}: not signed (no signature is attached to {digest})")
        reasons: list[str] = []
        for desc in found[:MAX_SIGNATURES]:
            try:
                raw = referrers.fetch_one(repo, desc, digest, BUNDLE_TYPE, BUNDLE_LIMIT)
            except PublishError as e:
                reasons.append(f"{desc.digest[7:19]}: {str(e).removeprefix(what + ': ')}")
                continue
            failures = []
            for public in publics:
                try:
                    check_bundle(raw, public, digest)
                except ValueError as e:
                    failures.append(str(e))
                    continue
                return digest
            reasons.append(f"{desc.digest[7:19]}: {', '.join(sorted(set(failures)))}")
    names = ", ".join(p.name for p in keys)
    why = "; ".join(reasons)[:400]
    raise SignatureError(f"{what}: no signature verifies with {names} ({len(reasons)} checked: {why})")


def verified(
    ref: ImageRef, keys: Sequence[Path], insecure: bool = False, log: Say = lambda msg: None
) -> ImageRef:
    """`ref` pinned to the digest `verify` found signed: what a verified pull then fetches, so the bytes
    pulled are the ones the signature covers even if the tag moves meanwhile."""
    digest = verify(ref, keys, insecure)
    log(f"verified {ref.docker_name}: {digest} is signed ({', '.join(p.name for p in keys)})")
    return dataclasses.replace(ref, digest=digest)


@dataclass(frozen=True)
class Rule:
    """One rule of a policy file: images whose `registry/repository` matches `match` (fnmatch) need a
    signature by one of `keys`, or none when `unsigned` (an explicit opt-out)."""

    match: str
    keys: tuple[Path, ...]
    unsigned: bool


def load_policy(path: Path) -> tuple[Rule, ...]:
    """The rules of the JSON policy file `path`:

        {"rules": [{"match": "registry.example.com/team/*", "keys": ["team.pub"]},
                   {"match": "localhost:5000/*", "unsigned": true}]}

    Key paths are relative to the policy's directory. SignatureError for anything else (unknown fields,
    a rule with both or neither of keys and unsigned)."""
    try:
        if path.stat().st_size > POLICY_LIMIT:
            raise SignatureError(f"{path}: larger than {POLICY_LIMIT} bytes for a policy file")
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the policy: {e.strerror}") from None
    except ValueError as e:
        raise SignatureError(f"{path}: not a JSON policy ({e})") from None
    rules = doc.get("rules") if isinstance(doc, dict) and set(doc) == {"rules"} else None
    if not isinstance(rules, list) or not rules:
        raise SignatureError(f'{path}: a policy is {{"rules": [{{"match": ..., "keys": [...]}}, ...]}}')
    out = []
    for n, rule in enumerate(rules):
        where = f"{path}: rule {n + 1}"
        if not isinstance(rule, dict) or not set(rule) <= {"match", "keys", "unsigned"}:
            raise SignatureError(f"{where}: only match, keys and unsigned are known")
        match, keys, unsigned = rule.get("match"), rule.get("keys"), rule.get("unsigned", False)
        if not isinstance(match, str) or not match or not isinstance(unsigned, bool):
            raise SignatureError(f"{where}: match must be a pattern, unsigned true or false")
        if unsigned == (keys is not None):
            raise SignatureError(f'{where}: give either keys or "unsigned": true')
        if not unsigned and not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            raise SignatureError(f"{where}: keys must be a list of public key files")
        out.append(Rule(match, tuple(path.parent / k for k in keys or ()), unsigned))
    return tuple(out)


def by_policy(ref: ImageRef, policy: Path, insecure: bool = False, log: Say = lambda msg: None) -> ImageRef:
    """`ref` as the policy file `policy` admits it: the first rule matching `registry/repository` decides:
    pinned to the digest verified with its keys (`verified`), or as is for an `unsigned` rule; no rule
    matching: SignatureError."""
    name = f"{ref.registry}/{ref.repository}"
    for rule in load_policy(policy):
        if fnmatch.fnmatchcase(name, rule.match):
            if rule.unsigned:
                log(f"policy {policy.name}: {name} may run unsigned (rule {rule.match!r})")
                return ref
            return verified(ref, rule.keys, insecure, log)
    raise SignatureError(f"{ref.docker_name}: no rule of the policy {policy} admits {name}")


def admit(
    ref: ImageRef, key: Path | None, policy: Path | None, insecure: bool = False, log: Say = lambda msg: None
) -> ImageRef:
    """What `pull`/`run` fetch under `--verify-key KEY` (`verified`) or `--verify-policy FILE` (`by_policy`);
    `ref` itself when neither is given. Both at once: SignatureError."""
    if key is not None and policy is not None:
        raise SignatureError("--verify-key and --verify-policy exclude each other")
    if key is not None:
        return verified(ref, [key], insecure, log)
    if policy is not None:
        return by_policy(ref, policy, insecure, log)
    return ref
