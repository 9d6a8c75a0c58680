"""Sigstore signatures in cosign's layout, made with python3-cryptography,
for the tests of the signature policy: the unit tests verify them in
memory, the end-to-end tests push them beside an image (on Debian 12,
which has no cosign; Debian 13's cosign makes real ones too).

A signature is a simple-signing payload naming a manifest's digest and a
docker reference, signed with a key; pushed, it is a layer of the
manifest tagged sha256-HEX.sig, its signature in an annotation.
"""

import base64
import hashlib
import json

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"


class Key:
    """A private key of KIND (ecdsa, rsa, ed25519) and its public PEM."""

    def __init__(self, kind="ecdsa"):
        self.kind = kind
        if kind == "ecdsa":
            self.private = ec.generate_private_key(ec.SECP256R1())
        elif kind == "rsa":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data):
        if self.kind == "ecdsa":
            return self.private.sign(data, ec.ECDSA(hashes.SHA256()))
        if self.kind == "rsa":
            from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self.private.sign(data)


def payload(manifest_digest, reference, kind="cosign container image signature"):
    """The simple-signing payload of MANIFEST_DIGEST for REFERENCE."""
    return json.dumps({"critical": {"identity": {"docker-reference": reference},
                                    "image": {"docker-manifest-digest": manifest_digest},
                                    "type": kind},
                       "optional": None}).encode()


def signature(key, manifest_digest, reference, **fields):
    """(payload, base64 signature) of MANIFEST_DIGEST for REFERENCE by KEY."""
    data = payload(manifest_digest, reference, **fields)
    return data, base64.b64encode(key.sign(data)).decode()


def attachment(signatures):
    """(manifest bytes, {digest: blob bytes}) of cosign's attachment holding
    SIGNATURES, [(payload, base64 signature)]."""
    blobs = {}

    def store(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **store(b"{}")},
        "layers": [{"mediaType": PAYLOAD_TYPE, **store(data),
                    "annotations": {SIGNATURE_ANNOTATION: encoded}}
                   for data, encoded in signatures]}
    return json.dumps(manifest).encode(), blobs


def attachment_tag(manifest_digest):
    return manifest_digest.replace(":", "-") + ".sig"
