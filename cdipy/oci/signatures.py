"""Sigstore signatures, verified by cdi.py itself for a policy's
sigstoreSigned requirements with a public key (see policy.py), so that an
image or artifact read lazily is read only once its manifest is trusted.

Where they are: cosign's layout, which containers/image reads when
registries.d says use-sigstore-attachments: the manifest tagged
sha256-HEX.sig in the image's repository, each of its layers a payload
(application/vnd.dev.cosign.simplesigning.v1+json) with its signature,
base64, in the annotation dev.cosignproject.cosign/signature.  A payload
names the manifest's digest (critical.image.docker-manifest-digest) and
an identity (critical.identity.docker-reference), which the requirement's
signedIdentity must accept.

The signatures of a manifest that passed are kept in the cache (as they
were read, never as a verdict) and verified again, against the policy in
force then, at every later start: offline too, and a tightened policy
refuses what it no longer accepts.
"""

import base64
import hashlib
import json
import logging

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..cache import file_name
from ..errors import CdiError, RegistryError
from ..reference import DIGEST, parse_reference

__all__ = ["SignatureCheck", "identity_accepts", "verify_requirement"]

log = logging.getLogger("cdipy")

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
# containers/image's limit on a signature's size.
MAX_PAYLOAD = 4 << 20
NO_SIGNATURE = "A signature was required, but no signature exists"


def identity_accepts(identity, image, signed):
    """Whether signedIdentity IDENTITY accepts a signature naming SIGNED
    (a Reference) for IMAGE (the Reference the user asked for), as
    containers-policy.json(5) says."""
    match = IDENTITY_MATCHES.get(identity.get("type"))
    try:
        return bool(match) and match(identity, image, signed)
    except ValueError:  # a reference in the policy that is none: accept nothing
        return False


def exact_reference(identity, image, signed):
    wanted = parse_reference(identity.get("dockerReference"))
    return not wanted.name_only() and not signed.name_only() and str(signed) == str(wanted)


IDENTITY_MATCHES = {
    "matchExact": lambda identity, image, signed:
        not image.name_only() and str(signed) == str(image),
    "matchRepoDigestOrExact": lambda identity, image, signed:
        repo_digest_or_exact(image, signed),
    "matchRepository": lambda identity, image, signed: signed.name == image.name,
    "exactReference": exact_reference,
    "exactRepository": lambda identity, image, signed:
        signed.name == parse_reference(identity.get("dockerRepository")).name,
    "remapIdentity": lambda identity, image, signed:
        repo_digest_or_exact(remapped(image, identity), signed),
}


def repo_digest_or_exact(image, signed):
    if signed.name_only():
        return False
    if image.tag is not None:
        return str(signed) == str(image)
    return image.digest is not None and signed.name == image.name


def remapped(image, identity):
    """IMAGE with remapIdentity's prefix replaced by its signedPrefix."""
    prefix, signed_prefix = identity.get("prefix", ""), identity.get("signedPrefix", "")
    text = str(image)
    if prefix and (text == prefix or (text.startswith(prefix) and text[len(prefix)] in "/:@")):
        return parse_reference(signed_prefix + text[len(prefix):])
    return image


def verify_requirement(keys, identity, signatures, manifest_digest, image):
    """None if one of SIGNATURES ([(payload bytes, base64 signature)])
    satisfies a sigstoreSigned requirement with public KEYS (PEM bytes)
    and signedIdentity IDENTITY, for the manifest MANIFEST_DIGEST of IMAGE
    (a Reference); else why not, in containers/image's words."""
    if not signatures:
        return NO_SIGNATURE
    verifiers = [load_key(key) for key in keys]
    reasons = []
    for payload, signature in signatures:
        try:
            check_one(verifiers, identity, (payload, signature), manifest_digest, image)
            return None
        except NotAccepted as reason:
            reasons.append(str(reason))
    if len(reasons) == 1:
        return reasons[0]
    return "None of the signatures were accepted, reasons: " + "; ".join(reasons)


class NotAccepted(Exception):
    """Why one signature is not accepted."""


def check_one(verifiers, identity, signature, manifest_digest, image):
    """NotAccepted unless SIGNATURE, (payload, base64 signature), is one of
    VERIFIERS' over a payload naming MANIFEST_DIGEST and an identity that
    IDENTITY accepts for IMAGE."""
    payload, encoded = signature
    try:
        raw = base64.b64decode(encoded or "", validate=True)
    except ValueError:
        raise NotAccepted("the signature annotation is not base64") from None
    if not raw:
        raise NotAccepted("a signature layer has no signature annotation")
    if not any(verified(verifier, raw, payload) for verifier in verifiers):
        raise NotAccepted("cryptographic signature verification failed: no key of the "
                          "policy signed it")
    try:
        critical = json.loads(payload)["critical"]
        kind = critical["type"]
        signed_digest = critical["image"]["docker-manifest-digest"]
        signed = parse_reference(critical["identity"]["docker-reference"])
    except (ValueError, KeyError, TypeError) as error:
        raise NotAccepted(f"the signed payload is not a simple signing payload ({error})") \
            from None
    if kind != SIGNATURE_TYPE:
        raise NotAccepted(f"the signed payload's type is {kind!r}, not {SIGNATURE_TYPE!r}")
    if signed_digest != manifest_digest:
        raise NotAccepted(f"Signature for docker-manifest-digest {signed_digest!r} does not "
                          f"match (the manifest is {manifest_digest})")
    if not identity_accepts(identity, image, signed):
        raise NotAccepted(f"Signature for identity {str(signed)!r} is not accepted "
                          f"({identity.get('type')}, for {image})")


def load_key(pem):
    try:
        return serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise CdiError(f"a public key of the signature policy cannot be read: {error}") from None


def verified(key, signature, payload):
    """Whether SIGNATURE is KEY's over PAYLOAD, as sigstore signs: SHA-256
    for ECDSA and RSA (PKCS #1 v1.5), Ed25519 as it is."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        else:
            return False
    except InvalidSignature:
        return False
    return True


class SignatureCheck:
    """The sigstore requirements of TRUST (policy.Trust, how == "verify")
    for IMAGE (a Reference), with the signatures that passed kept in
    RECORDS (a cache.PrivateCache); ATTACHMENTS, whether registries.d lets
    signatures be read from the registry (containers/image reads none
    otherwise)."""

    def __init__(self, trust, image, records, attachments):
        self.trust, self.image, self.records = trust, image, records
        self.attachments = attachments

    def check_registry(self, registry, manifest_digest):
        """Verify the signatures REGISTRY holds for MANIFEST_DIGEST, and keep
        them; PolicyRefusal if they do not satisfy the policy, or cannot be
        read."""
        if not self.attachments:
            raise self.trust.refusal(f"{NO_SIGNATURE} (registries.d does not set "
                                     "use-sigstore-attachments for it)")
        try:
            signatures = attached_signatures(registry, manifest_digest, self.trust.image_name)
        except CdiError as error:
            raise self.trust.refusal(f"its signatures cannot be read: {error}") from None
        reason = self.reason(signatures, manifest_digest)
        if reason is not None:
            raise self.trust.refusal(reason)
        self.records.write(file_name(manifest_digest), json.dumps(
            [{"payload": base64.b64encode(payload).decode(), "signature": signature}
             for payload, signature in signatures]).encode())
        log.debug(f"{self.trust.image_name}: the signature of {manifest_digest} is verified "
                  f"({self.trust.words()}, {self.trust.path})")

    def check_recorded(self, manifest_digest):
        """None if the signatures kept for MANIFEST_DIGEST satisfy the policy
        now; else why not."""
        data = self.records.read(file_name(manifest_digest))
        try:
            signatures = [(base64.b64decode(entry["payload"]), entry["signature"])
                          for entry in json.loads(data)] if data else []
        except (ValueError, KeyError, TypeError):
            signatures = []
        if not signatures:
            return "no verified signature is kept for it in the cache"
        reason = self.reason(signatures, manifest_digest)
        if reason is None:
            log.debug(f"{self.trust.image_name}: the kept signature of {manifest_digest} "
                      f"passes the policy {self.trust.path}")
        return reason

    def reason(self, signatures, manifest_digest):
        for keys, identity in self.trust.keyed():
            reason = verify_requirement(keys, identity, signatures, manifest_digest, self.image)
            if reason is not None:
                return reason
        return None


def attached_signatures(registry, manifest_digest, image_name):
    """[(payload, base64 signature)] of the cosign attachment of
    MANIFEST_DIGEST in REGISTRY's repository; [] if there is none."""
    tag = file_name(manifest_digest) + ".sig"  # cosign's tag: sha256-HEX.sig
    try:
        data, _, _ = registry.manifest(tag)
    except RegistryError as error:
        if error.status == 404:
            return []
        raise CdiError(f"{image_name}: reading its signatures ({tag}): {error}") from None
    try:
        layers = json.loads(data).get("layers") or []
    except (ValueError, AttributeError):
        raise CdiError(f"{image_name}: its signature manifest {tag} is not JSON") from None
    signatures = []
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType") != PAYLOAD_TYPE:
            continue
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD or \
                not DIGEST.fullmatch(str(digest)):
            raise CdiError(f"{image_name}: its signature manifest {tag} has a layer of "
                           f"size {size!r}, digest {digest!r}")
        payload = registry.blob_range(digest, 0, size)
        if "sha256:" + hashlib.sha256(payload).hexdigest() != digest:
            raise CdiError(f"{image_name}: a signature payload does not match its digest "
                           f"{digest}")
        signatures.append((payload, (layer.get("annotations") or {}).get(
            SIGNATURE_ANNOTATION, "")))
    return signatures
