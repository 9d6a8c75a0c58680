"""The signature policy as containers/image reads it: which file, which
scope, what cdi.py makes of the requirements; registries.d; and the
admission of an image in the cache under each.  Files in tmp_path; no
network, no podman."""

import base64
import json

import pytest

from cdipy.admission import Admission, trust_of
from cdipy.cache import PrivateCache
from cdipy.errors import CdiError, PolicyRefusal
from cdipy.parameters import Settings
from cdipy.policy import SignaturePolicy, docker_scopes, registries_d_attachments
from signing import Key, signature

ACCEPT = [{"type": "insecureAcceptAnything"}]
REJECT = [{"type": "reject"}]
DIGEST = "sha256:" + "ab" * 32
ATTACHMENTS_ON = "default-docker:\n  use-sigstore-attachments: true\n"


def policy_file(tmp_path, policy):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return str(path)


def load(tmp_path, policy):
    return SignaturePolicy.load(policy_file(tmp_path, policy))


def settings(name, policy_path=None, **values):
    result = Settings(name=name, signature_policy=policy_path)
    for key, value in values.items():
        setattr(result, key, value)
    return result


# ------------------------------------------------------------- which file

def test_the_parameter_names_the_file(tmp_path):
    path = policy_file(tmp_path, {"default": REJECT})
    assert SignaturePolicy.load(path).path == path


def test_the_users_file_comes_before_the_systems(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    user = tmp_path / ".config/containers/policy.json"
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps({"default": REJECT}))
    assert SignaturePolicy.load().path == str(user)


def test_without_a_users_file_the_systems(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert SignaturePolicy.load().path == "/etc/containers/policy.json"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CdiError) as error:
        SignaturePolicy.load(str(tmp_path / "nowhere.json"))
    assert str(error.value) == (
        f"no signature policy at {tmp_path}/nowhere.json (containers-policy.json(5)): "
        "install containers-common or pass signature-policy=PATH")


@pytest.mark.parametrize(("policy", "message"), [
    ({}, 'no "default" list of requirements'),
    ({"default": []}, "default: a list of at least one requirement is needed"),
    ({"default": [{"type": "trustMe"}]}, "default: unknown requirement type 'trustMe'"),
    ({"default": ACCEPT, "transports": {"docker": {"x.io": [{"type": "sigstoreSigned"}]}}},
     'transport docker scope "x.io": sigstoreSigned needs exactly one of keyPath, keyPaths, '
     "keyData, keyDatas (or fulcio, or pki)"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k", "keyData": "AA=="}]},
     "default: sigstoreSigned needs exactly one of keyPath, keyPaths, keyData, keyDatas "
     "(or fulcio, or pki)"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k",
                   "signedIdentity": {"type": "exactReference"}}]},
     "default: signedIdentity exactReference needs dockerReference"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k",
                   "signedidentity": {"type": "matchRepository"}}]},
     "default: sigstoreSigned has no field 'signedidentity'"),
    ({"default": [{"type": "sigstoreSigned", "keyPath": "/k",
                   "signedIdentity": {"type": "matchRepository", "prefix": "x"}}]},
     "default: signedIdentity matchRepository has no field 'prefix'"),
    ({"default": [{"type": "reject", "keyPath": "/k"}]}, "default: reject has no field 'keyPath'"),
])
def test_a_malformed_policy_is_refused_saying_where(tmp_path, policy, message):
    with pytest.raises(CdiError) as error:
        load(tmp_path, policy)
    assert str(error.value) == f"signature policy {tmp_path}/policy.json: {message}"


def test_a_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text("{")
    with pytest.raises(CdiError, match=f"^signature policy {path}: Expecting"):
        SignaturePolicy.load(str(path))


# ------------------------------------------------------------ which scope

def test_docker_scopes_in_containers_images_order():
    assert docker_scopes("registry.example.com:5000", "ns/sub/repo", "1") == (
        "registry.example.com:5000/ns/sub/repo:1",
        ["registry.example.com:5000/ns/sub/repo", "registry.example.com:5000/ns/sub",
         "registry.example.com:5000/ns", "registry.example.com:5000",
         "*.example.com", "*.com"])


def test_a_digest_is_the_identity_of_a_digested_name():
    assert docker_scopes("quay.io", "org/disk", digest=DIGEST)[0] == f"quay.io/org/disk@{DIGEST}"


@pytest.mark.parametrize(("scope", "name"), [
    ("quay.io/org/disk:1", "quay.io/org/disk:1"),
    ("quay.io/org/disk", "quay.io/org/disk:2"),
    ("quay.io/org", "quay.io/org/disk:1"),
    ("quay.io", "quay.io/org/disk:1"),
    ("*.io", "quay.io/org/disk:1"),
    ("docker.io/library/busybox", "docker.io/busybox"),
])
def test_the_matching_scope_decides(tmp_path, scope, name):
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"docker": {scope: REJECT}}})
    trust = trust_of(policy, settings(name))[0]
    assert (trust.how, trust.scope) == ("reject", f'transport docker scope "{scope}"')


def test_the_most_specific_scope_wins(tmp_path):
    policy = load(tmp_path, {"default": REJECT, "transports": {"docker": {
        "quay.io": REJECT, "quay.io/org/disk": ACCEPT}}})
    assert trust_of(policy, settings("quay.io/org/disk:1"))[0].how == "accept"
    assert trust_of(policy, settings("quay.io/org/other:1"))[0].how == "reject"


def test_the_transports_empty_scope_before_the_default(tmp_path):
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"docker": {"": REJECT}}})
    trust = trust_of(policy, settings("quay.io/org/disk:1"))[0]
    assert (trust.how, trust.scope) == ("reject", 'transport docker, scope ""')


def test_another_transports_scopes_do_not_apply(tmp_path):
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"oci-archive": {"": REJECT}}})
    assert trust_of(policy, settings("quay.io/org/disk:1"))[0].how == "accept"


def test_an_archive_is_judged_by_its_path(tmp_path):
    archive = tmp_path / "images" / "disk.tar"
    policy = load(tmp_path, {"default": ACCEPT, "transports": {
        "oci-archive": {str(tmp_path / "images"): REJECT}}})
    assert trust_of(policy, settings(f"oci-archive:{archive}"))[0].how == "reject"
    assert trust_of(policy, settings(f"oci-archive:{tmp_path}/else.tar"))[0].how == "accept"


@pytest.mark.parametrize(("requirements", "how"), [
    (ACCEPT, "accept"),
    (ACCEPT + REJECT, "reject"),
    ([{"type": "sigstoreSigned", "keyPath": "/k.pub"}], "verify"),
    ([{"type": "sigstoreSigned", "keyData": "AA=="}, *ACCEPT], "verify"),
    ([{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}], "hand"),
    ([{"type": "sigstoreSigned", "keyPath": "/k.pub", "rekorPublicKeyPath": "/r.pub"}],
     "hand"),
    ([{"type": "sigstoreSigned", "fulcio": {"caPath": "/ca"}}], "hand"),
])
def test_how_each_requirement_is_honoured(tmp_path, requirements, how):
    policy = load(tmp_path, {"default": requirements})
    assert trust_of(policy, settings("quay.io/org/disk:1"))[0].how == how


def test_reject_refuses_naming_the_image_and_the_file(tmp_path):
    policy = load(tmp_path, {"default": REJECT})
    with pytest.raises(PolicyRefusal) as error:
        Admission(policy, settings("quay.io/org/disk:1"), PrivateCache(None))
    assert str(error.value) == (f"quay.io/org/disk:1: rejected by the signature policy "
                                f"{tmp_path}/policy.json (default): the policy rejects it")


# ------------------------------------------------------------ registries.d

def registries_d(tmp_path, monkeypatch, **files):
    monkeypatch.setenv("HOME", str(tmp_path))
    directory = tmp_path / ".config/containers/registries.d"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)


def test_attachments_from_default_docker(tmp_path, monkeypatch):
    registries_d(tmp_path, monkeypatch, default=ATTACHMENTS_ON)
    assert registries_d_attachments(*docker_scopes("quay.io", "org/disk", "1"))


def test_a_scope_overrides_default_docker(tmp_path, monkeypatch):
    registries_d(tmp_path, monkeypatch,
                 default=ATTACHMENTS_ON,
                 quay="docker:\n  quay.io/org:\n    use-sigstore-attachments: false\n")
    assert not registries_d_attachments(*docker_scopes("quay.io", "org/disk", "1"))
    assert registries_d_attachments(*docker_scopes("quay.io", "else/disk", "1"))


def test_no_attachments_unless_said(tmp_path, monkeypatch):
    registries_d(tmp_path, monkeypatch, other="docker:\n  quay.io:\n    lookaside: file:///x\n")
    assert not registries_d_attachments(*docker_scopes("quay.io", "org/disk", "1"))


def test_default_docker_twice_is_an_error(tmp_path, monkeypatch):
    registries_d(tmp_path, monkeypatch, a=ATTACHMENTS_ON, b=ATTACHMENTS_ON)
    with pytest.raises(CdiError, match="default-docker is set in two files"):
        registries_d_attachments(*docker_scopes("quay.io", "org/disk", "1"))


# ------------------------------------- what is already here, under verify

@pytest.fixture
def signed_setup(tmp_path, monkeypatch):
    """A policy asking for a signature by KEY, attachments allowed, and the
    admission of quay.io/org/disk:1 with pull=never."""
    registries_d(tmp_path, monkeypatch, default=ATTACHMENTS_ON)
    key = Key()
    (tmp_path / "key.pub").write_bytes(key.public_pem)
    policy = load(tmp_path, {"default": [{"type": "sigstoreSigned",
                                          "keyPath": str(tmp_path / "key.pub")}]})
    records = PrivateCache(str(tmp_path / "signatures"))
    admission = Admission(policy, settings("quay.io/org/disk:1", pull="never"), records)
    return key, admission, records


def keep(records, signatures):
    records.write(DIGEST.replace(":", "-"), json.dumps(
        [{"payload": base64.b64encode(data).decode(), "signature": encoded}
         for data, encoded in signatures]).encode())


def test_a_kept_signature_admits_what_is_here(signed_setup):
    key, admission, records = signed_setup
    keep(records, [signature(key, DIGEST, "quay.io/org/disk:1")])
    assert admission.check_here([DIGEST], "the cache")


def test_a_kept_signature_by_another_key_is_refused(signed_setup):
    _, admission, records = signed_setup
    keep(records, [signature(Key(), DIGEST, "quay.io/org/disk:1")])
    with pytest.raises(PolicyRefusal, match="cryptographic signature verification failed"):
        admission.check_here([DIGEST], "the cache")


def test_nothing_kept_and_pull_never_is_refused(signed_setup, tmp_path):
    _, admission, _ = signed_setup
    with pytest.raises(PolicyRefusal) as error:
        admission.check_here([DIGEST], "the cache")
    assert str(error.value) == (
        f"quay.io/org/disk:1: rejected by the signature policy {tmp_path}/policy.json "
        "(default): no verified signature is kept for it in the cache (the cache), and "
        "pull=never forbids reading its signatures from its registry")


def test_hand_serves_nothing_from_here(tmp_path):
    policy = load(tmp_path, {"default": [{"type": "signedBy", "keyType": "GPGKeys",
                                          "keyPath": "/k.gpg"}]})
    admission = Admission(policy, settings("quay.io/org/disk:1"), PrivateCache(None))
    assert not admission.check_here([DIGEST], "the cache")


def test_accept_serves_what_is_here(tmp_path):
    admission = Admission(load(tmp_path, {"default": ACCEPT}), settings("quay.io/org/disk:1"),
                          PrivateCache(None))
    assert admission.check_here([None], "the cache")


# ------------------------------------------- names, as containers/image reads them

@pytest.mark.parametrize("name", [
    "index.docker.io/library/busybox:1",          # Docker Hub under another name
    "docker.io/busybox:1",                        # its short repository
    f"docker.io/library/busybox:1@{DIGEST}",      # a tag and a digest: the digest
])
def test_spellings_of_one_repository_share_its_scope(tmp_path, name):
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"docker": {
        "docker.io/library/busybox": REJECT}}})
    assert trust_of(policy, settings(name))[0].how == "reject"


@pytest.mark.parametrize("name", ["quay.io/x/../protected/img:1", "quay.io/protected%2fimg:1",
                                  "quay.io/Protected/img:1"])
def test_a_name_that_is_no_reference_is_refused_where_scopes_differ(tmp_path, name):
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"docker": {
        "quay.io/protected/img": REJECT}}})
    with pytest.raises(PolicyRefusal) as error:
        Admission(policy, settings(name), PrivateCache(None))
    assert str(error.value).endswith(
        "(default): it is not an image reference, so no scope of the policy can be told")


def test_a_name_that_is_no_reference_passes_a_policy_that_accepts_all(tmp_path):
    policy = load(tmp_path, {"default": ACCEPT})
    assert trust_of(policy, settings("quay.io/a$(true)/b:1"))[0].how == "accept"


def test_a_short_name_is_handed_to_podman_where_the_policy_has_scopes(tmp_path):
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"docker": {
        "registry.redhat.io": [{"type": "signedBy", "keyType": "GPGKeys",
                                "keyPath": "/k.gpg"}]}}})
    assert trust_of(policy, settings("rhel9/rhel-guest-image"))[0].how == "hand"


def test_a_short_name_under_a_uniform_policy_is_judged_by_it(tmp_path):
    policy = load(tmp_path, {"default": REJECT})
    assert trust_of(policy, settings("rhel9/rhel-guest-image"))[0].how == "reject"
    policy = load(tmp_path, {"default": ACCEPT, "transports": {"docker": {"": ACCEPT}}})
    assert trust_of(policy, settings("rhel9/rhel-guest-image"))[0].how == "accept"


def test_a_short_name_that_needs_signatures_is_handed_to_podman(tmp_path):
    policy = load(tmp_path, {"default": [{"type": "sigstoreSigned", "keyPath": "/k.pub"}]})
    admission = Admission(policy, settings("fedora"), PrivateCache(None))
    assert admission.how == "hand"
    assert not admission.check_here(["sha256:" + "ab" * 32], "podman's storage")
