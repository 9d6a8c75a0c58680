"""Sigstore signatures verified by cdi.py itself: the key, the payload's
manifest digest, its identity against each signedIdentity.  Keys made
here with python3-cryptography; no network."""

import base64
import json

import pytest

from cdipy.oci.signatures import (
    NO_SIGNATURE,
    identity_accepts,
    parse_reference,
    verify_requirement,
)
from signing import Key, payload, signature

DIGEST = "sha256:" + "12" * 32
OTHER_DIGEST = "sha256:" + "34" * 32
IMAGE = parse_reference("registry.example:5000/vm/disk:1")
DEFAULT = {"type": "matchRepoDigestOrExact"}


def verify(key, signatures, identity=DEFAULT, image=IMAGE, digest=DIGEST):
    return verify_requirement([key.public_pem], identity, signatures, digest, image)


@pytest.mark.parametrize("kind", ["ecdsa", "rsa", "ed25519"])
def test_a_signature_by_the_key_is_accepted(kind):
    key = Key(kind)
    assert verify(key, [signature(key, DIGEST, "registry.example:5000/vm/disk:1")]) is None


def test_no_signature_in_containers_images_words():
    assert verify(Key(), []) == NO_SIGNATURE == \
        "A signature was required, but no signature exists"


def test_another_key_is_refused():
    assert verify(Key(), [signature(Key(), DIGEST, "registry.example:5000/vm/disk:1")]) == (
        "cryptographic signature verification failed: no key of the policy signed it")


def test_one_key_of_several_is_enough():
    key = Key()
    signed = [signature(key, DIGEST, "registry.example:5000/vm/disk:1")]
    assert verify_requirement([Key().public_pem, key.public_pem], DEFAULT, signed, DIGEST,
                              IMAGE) is None


def test_another_manifest_is_refused():
    key = Key()
    assert verify(key, [signature(key, OTHER_DIGEST, "registry.example:5000/vm/disk:1")]) == (
        f"Signature for docker-manifest-digest {OTHER_DIGEST!r} does not match "
        f"(the manifest is {DIGEST})")


def test_another_repository_is_refused():
    key = Key()
    assert verify(key, [signature(key, DIGEST, "registry.example:5000/vm/other:1")]) == (
        "Signature for identity 'registry.example:5000/vm/other:1' is not accepted "
        "(matchRepoDigestOrExact, for registry.example:5000/vm/disk:1)")


def test_a_payload_changed_after_signing_is_refused():
    key = Key()
    data, encoded = signature(key, DIGEST, "registry.example:5000/vm/disk:1")
    assert verify(key, [(data.replace(b"vm/disk", b"vm/dusk"), encoded)]).startswith(
        "cryptographic signature verification failed")


def test_another_payload_type_is_refused():
    key = Key()
    signed = signature(key, DIGEST, "registry.example:5000/vm/disk:1", kind="atomic")
    assert verify(key, [signed]) == ("the signed payload's type is 'atomic', not "
                                      "'cosign container image signature'")


def test_not_a_payload_is_refused():
    key = Key()
    data = json.dumps({"critical": {}}).encode()
    encoded = base64.b64encode(key.sign(data)).decode()
    assert verify(key, [(data, encoded)]).startswith(
        "the signed payload is not a simple signing payload")


def test_a_missing_annotation_is_refused():
    assert verify(Key(), [(payload(DIGEST, "x.io/a:1"), "")]) == (
        "a signature layer has no signature annotation")


def test_one_good_signature_among_bad_ones_is_enough():
    key = Key()
    assert verify(key, [signature(Key(), DIGEST, "registry.example:5000/vm/disk:1"),
                        signature(key, DIGEST, "registry.example:5000/vm/disk:1")]) is None


def test_every_reason_when_none_passes():
    key = Key()
    reason = verify(key, [signature(Key(), DIGEST, "registry.example:5000/vm/disk:1"),
                          signature(key, OTHER_DIGEST, "registry.example:5000/vm/disk:1")])
    assert reason.startswith("None of the signatures were accepted, reasons: "
                             "cryptographic signature verification failed")
    assert "does not match" in reason


# ----------------------------------------------------------- identities

@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", "docker.io/library/busybox"),
    ("docker.io/busybox:1", "docker.io/library/busybox:1"),
    ("user/image", "docker.io/user/image"),
    ("localhost/disk", "localhost/disk"),
    ("registry.example:5000/vm/disk@" + DIGEST, "registry.example:5000/vm/disk@" + DIGEST),
])
def test_references_are_normalized(text, expected):
    assert str(parse_reference(text)) == expected


@pytest.mark.parametrize("text", ["", "UPPER/case", "a//b", "x.io/a:", 5])
def test_not_a_reference(text):
    with pytest.raises(ValueError):
        parse_reference(text)


DIGESTED = parse_reference(f"registry.example:5000/vm/disk@{DIGEST}")


@pytest.mark.parametrize(("identity", "image", "signed", "accepted"), [
    (DEFAULT, IMAGE, "registry.example:5000/vm/disk:1", True),
    (DEFAULT, IMAGE, "registry.example:5000/vm/disk:2", False),
    (DEFAULT, IMAGE, "registry.example:5000/vm/disk", False),   # cosign's own payloads
    (DEFAULT, DIGESTED, "registry.example:5000/vm/disk:any", True),
    (DEFAULT, DIGESTED, "registry.example:5000/vm/other:any", False),
    ({"type": "matchExact"}, IMAGE, "registry.example:5000/vm/disk:1", True),
    ({"type": "matchExact"}, DIGESTED, "registry.example:5000/vm/disk:1", False),
    ({"type": "matchRepository"}, IMAGE, "registry.example:5000/vm/disk", True),
    ({"type": "matchRepository"}, IMAGE, "registry.example:5000/vm/other:1", False),
    ({"type": "exactReference", "dockerReference": "quay.io/vm/disk:7"}, IMAGE,
     "quay.io/vm/disk:7", True),
    ({"type": "exactReference", "dockerReference": "quay.io/vm/disk:7"}, IMAGE,
     "registry.example:5000/vm/disk:1", False),
    ({"type": "exactRepository", "dockerRepository": "quay.io/vm/disk"}, IMAGE,
     "quay.io/vm/disk:9", True),
    ({"type": "remapIdentity", "prefix": "registry.example:5000/vm",
      "signedPrefix": "quay.io/prod"}, IMAGE, "quay.io/prod/disk:1", True),
    ({"type": "remapIdentity", "prefix": "registry.example:5000/vm",
      "signedPrefix": "quay.io/prod"}, IMAGE, "registry.example:5000/vm/disk:1", False),
    ({"type": "remapIdentity", "prefix": "registry.example:5000/v",
      "signedPrefix": "quay.io/prod"}, IMAGE, "registry.example:5000/vm/disk:1", True),
    ({"type": "exactReference", "dockerReference": "NOT A REFERENCE"}, IMAGE,
     "registry.example:5000/vm/disk:1", False),
])
def test_signed_identity(identity, image, signed, accepted):
    assert identity_accepts(identity, image, parse_reference(signed)) is accepted
