"""The signature policy (containers-policy.json) honoured by cdi.py's own
reads: a containerdisk streamed into the cache and an ORAS artifact read by
ranges are refused, or verified, before any of their blobs is read; what
is already in the cache or podman's storage is served only if the policy
in force now accepts it; what cdi.py cannot verify itself is handed to
podman or skopeo.

Policies, registries.d and HOME are the test's own files.  Signatures are
made here with python3-cryptography in cosign's layout (tests/signing.py)
and pushed beside the image, as cosign would; where Debian has cosign
(13), real cosign signatures too, and skopeo's verdict on ours.
"""

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import nbdkit_error, params, run_nbdkit, serve, sha256
from lab import MIB, Blob, export_digest, podman, push_artifact, wait_for
from signing import Key, attachment, attachment_tag, signature

ACCEPT = [{"type": "insecureAcceptAnything"}]
REJECT = [{"type": "reject"}]
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
VM_EXPORT = {"artifact_type": "application/vnd.kubevirt.virtualmachine.v1",
             "config_type": "application/vnd.kubevirt.virtualmachine.config.v1+json",
             "config": b'{"name": "vm"}'}
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json,"
                  "application/vnd.docker.distribution.manifest.v2+json")
KEPT = "is whole in the cache"


@pytest.fixture(scope="module")
def keys():
    """(the key the policy trusts, another)."""
    return Key(), Key()


@pytest.fixture(scope="module")
def disk_data():
    return b"DISK" + os.urandom(2 * MIB - 4)


@pytest.fixture(scope="module")
def containerdisk(lab, disk_data):
    """push(what): the name of a containerdisk of DISK_DATA (one gzip layer,
    pushed by podman) in repository cdi-test/sig-WHAT of the open registry."""
    image = lab.build(f"localhost/cdi-test/sig-{os.urandom(4).hex()}:1",
                      [{"disk/disk.img": disk_data}])

    def push(what):
        name = f"cdi-test/sig-{what}:1"
        lab.push(image, f"{lab.registry}/{name}")
        return name

    yield push
    podman("rmi", "--force", image.id, check=False)


@pytest.fixture(scope="module")
def artifact_data(disk_data):
    """Four chunks of the registry's reads: one read fetches a quarter."""
    return disk_data * 4


@pytest.fixture(scope="module")
def artifact(lab, artifact_data):
    """The name of an ORAS artifact holding ARTIFACT_DATA, in the open registry."""
    name = "cdi-test/sig-artifact:1"
    push_artifact(lab.workdir, f"{lab.registry}/{name}", [Blob(LAYER_TAR, artifact_data,
                                                                "disk.img")])
    return name


@pytest.fixture
def home(tmp_path):
    """A HOME whose registries.d reads sigstore attachments."""
    directory = tmp_path / "home" / ".config" / "containers" / "registries.d"
    directory.mkdir(parents=True)
    (directory / "default.yaml").write_text("default-docker:\n  use-sigstore-attachments: true\n")
    return tmp_path / "home"


def environment(home):
    return {**os.environ, "HOME": str(home)}


@dataclasses.dataclass
class Setup:
    """What most tests here use: the lab, the open registry behind PROXY,
    an empty CACHE, a HOME of the test's own, and KEYS (the trusted one,
    another)."""
    lab: object
    proxy: object
    cache: str
    home: Path
    keys: tuple

    def params(self, name, *more):
        return params(self.proxy, name, self.cache, *more)

    def error(self, name, policy, *more):
        """nbdkit's error for NAME under POLICY."""
        return nbdkit_error(*self.params(name, f"signature-policy={policy}", *more),
                            env=environment(self.home))

    def refusal(self, policy_path, name, reason, scope="default"):
        return (f"{self.proxy.address}/{name}: rejected by the signature policy "
                f"{policy_path} ({scope}): {reason}")


@pytest.fixture
def setup(lab, proxy, cache, home, keys):
    return Setup(lab, proxy, cache, home, keys)


def write_policy(home, default, scopes=None, key=None, name="policy.json"):
    """A policy file in HOME (DEFAULT and docker SCOPES), KEY's public key
    beside it as key.pub; its path."""
    path = Path(home) / name
    if key is not None:
        (Path(home) / "key.pub").write_bytes(key.public_pem)
    path.write_text(json.dumps({"default": default,
                                "transports": {"docker": scopes or {}}}))
    return str(path)


def signed_by_key(home, **identity):
    """A sigstoreSigned requirement of the key in HOME/key.pub (a relative
    keyPath would be read from the working directory, as containers/image
    reads it)."""
    return [{"type": "sigstoreSigned", "keyPath": str(Path(home) / "key.pub"),
             **({"signedIdentity": identity} if identity else {})}]


def manifest_digest(registry, name):
    repository, _, tag = name.rpartition(":")
    response = requests.get(f"http://{registry}/v2/{repository}/manifests/{tag}",
                            headers={"Accept": MANIFEST_TYPES}, timeout=30)
    response.raise_for_status()
    return "sha256:" + hashlib.sha256(response.content).hexdigest()


def attach(registry, name, signatures):
    """Push cosign's attachment of SIGNATURES beside NAME, as cosign would."""
    repository = name.rpartition(":")[0]
    manifest, blobs = attachment(signatures)
    for digest, data in blobs.items():
        upload = requests.post(f"http://{registry}/v2/{repository}/blobs/uploads/", timeout=30)
        upload.raise_for_status()
        location = upload.headers["Location"]
        location = location if location.startswith("http") else f"http://{registry}{location}"
        requests.put(location, params={"digest": digest}, data=data,
                     timeout=30).raise_for_status()
    tag = attachment_tag(manifest_digest(registry, name))
    requests.put(f"http://{registry}/v2/{repository}/manifests/{tag}", data=manifest,
                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                 timeout=30).raise_for_status()


def sign(setup, name, key, *, digest=None, identity=None):
    """Sign NAME, as the plugin will name it through the proxy, with KEY: a
    payload naming DIGEST (default: its manifest's) and IDENTITY (default:
    the name through the proxy)."""
    registry = setup.lab.registry
    digest = digest or manifest_digest(registry, name)
    attach(registry, name, [signature(key, digest,
                                      identity or f"{setup.proxy.address}/{name}")])


def assert_nothing_kept(cache):
    kept = [str(path.relative_to(cache)) for path in Path(cache).rglob("*")
            if path.is_file() and not path.name.endswith(".lock")]
    assert kept == [], f"kept in the cache before the policy accepted it: {kept}"


def serve_digest(setup, name, policy, registry=None):
    """(the digest of the disk export, the server's log) of NAME under
    POLICY, through the proxy, else in REGISTRY (host:port) if given."""
    names = setup.params(name) if registry is None else (f"name={registry}/{name}",
                                                         f"cache={setup.cache}")
    with serve(setup.lab, *names, f"signature-policy={policy}", "layer=disk",
               env=environment(setup.home), verbose=True) as server:
        digest = export_digest(server.uri())
    return digest, server.log()


# ----------------------------------------------------------------- reject

def test_a_users_default_reject_refuses_a_containerdisk_before_reading_it(setup,
                                                                        containerdisk):
    name = containerdisk("reject")
    user_policy = write_policy(setup.home / ".config" / "containers", REJECT)
    error = nbdkit_error(*setup.params(name), env=environment(setup.home))
    assert setup.refusal(user_policy, name, "the policy rejects it") in error
    assert setup.proxy.blob_requests == 0
    assert_nothing_kept(setup.cache)


def test_default_reject_refuses_an_artifact(setup, artifact):
    policy = write_policy(setup.home, REJECT)
    error = setup.error(artifact, policy)
    assert setup.refusal(policy, artifact, "the policy rejects it") in error
    assert setup.proxy.blob_requests == 0
    assert_nothing_kept(setup.cache)


def test_default_reject_refuses_an_archive(setup, artifact, tmp_path):
    archive = tmp_path / "disk.tar"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{setup.lab.registry}/{artifact}", f"oci-archive:{archive}"],
                   check=True, stdin=subprocess.DEVNULL)
    policy = write_policy(setup.home, REJECT)
    error = nbdkit_error(f"name=oci-archive:{archive}", f"cache={setup.cache}",
                         f"signature-policy={policy}", env=environment(setup.home))
    assert (f"oci-archive:{archive}: rejected by the signature policy {policy} (default): "
            "the policy rejects it") in error
    assert_nothing_kept(setup.cache)


def test_a_repository_rejected_under_a_default_accept(setup, containerdisk, disk_data):
    rejected, accepted = containerdisk("repo-rejected"), containerdisk("repo-accepted")
    scope = f"{setup.proxy.address}/{rejected.rpartition(':')[0]}"
    policy = write_policy(setup.home, ACCEPT, {scope: REJECT})
    assert setup.refusal(policy, rejected, "the policy rejects it",
                         f'transport docker scope "{scope}"') in setup.error(rejected, policy)
    digest, _ = serve_digest(setup, accepted, policy)
    assert digest == sha256(disk_data)


def test_a_repository_accepted_under_a_default_reject(setup, containerdisk, disk_data):
    accepted, rejected = containerdisk("repo-accepted"), containerdisk("repo-rejected")
    policy = write_policy(setup.home, REJECT,
                          {f"{setup.proxy.address}/cdi-test/sig-repo-accepted": ACCEPT})
    digest, _ = serve_digest(setup, accepted, policy)
    assert digest == sha256(disk_data)
    assert setup.refusal(policy, rejected, "the policy rejects it") in \
        setup.error(rejected, policy)


# --------------------------------------------- sigstoreSigned with a key

def test_a_signed_containerdisk_is_verified_then_streamed(setup, containerdisk, disk_data):
    name = containerdisk("signed")
    sign(setup, name, setup.keys[0])
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    digest, log = serve_digest(setup, name, policy)
    assert digest == sha256(disk_data)
    verified = log.index(f"the signature of {manifest_digest(setup.lab.registry, name)} "
                         "is verified")
    assert verified < log.index("streamed from"), "a layer read before the signature passed"


def test_a_signed_artifact_is_verified_then_read_lazily(setup, artifact, artifact_data):
    sign(setup, artifact, setup.keys[0])
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    with serve(setup.lab, *setup.params(artifact, f"signature-policy={policy}"), "layer=disk",
               env=environment(setup.home), verbose=True) as server:
        handle = server.connect("disk")
        try:
            assert handle.pread(4096, 0) == artifact_data[:4096]
        finally:
            handle.shutdown()
        assert setup.proxy.blob_bytes < len(artifact_data) // 2, "read whole, not lazily"
    assert "as it is read" in server.log()
    assert f"the signature of {manifest_digest(setup.lab.registry, artifact)} is verified" \
        in server.log()


@pytest.mark.parametrize(("what", "reason"), [
    ("unsigned", "A signature was required, but no signature exists"),
    ("other-key", "cryptographic signature verification failed: no key of the policy "
                  "signed it"),
    ("other-digest", "Signature for docker-manifest-digest 'sha256:" + "0" * 64
                     + "' does not match (the manifest is {digest})"),
    ("other-identity", "Signature for identity '{registry}/cdi-test/sig-elsewhere:1' is not "
                       "accepted (matchRepoDigestOrExact, for {registry}/{name})"),
])
def test_a_containerdisk_whose_signature_fails_is_refused_unread(setup, containerdisk, what,
                                                                reason):
    name = containerdisk(what)
    key, other = setup.keys
    address = setup.proxy.address
    if what == "other-key":
        sign(setup, name, other)
    elif what == "other-digest":
        sign(setup, name, key, digest="sha256:" + "0" * 64)
    elif what == "other-identity":
        sign(setup, name, key, identity=f"{address}/cdi-test/sig-elsewhere:1")
    policy = write_policy(setup.home, signed_by_key(setup.home), key=key)
    assert setup.refusal(policy, name, reason.format(
        digest=manifest_digest(setup.lab.registry, name), registry=address, name=name)) \
        in setup.error(name, policy)
    assert setup.proxy.blob_bytes < 4096, "more than the signature's payload was read"
    assert_nothing_kept(setup.cache)


def test_matchRepository_accepts_cosigns_own_identity(setup, artifact, artifact_data):
    # cosign names the repository alone, which the default identity refuses.
    sign(setup, artifact, setup.keys[0],
         identity=f"{setup.proxy.address}/cdi-test/sig-artifact")
    strict = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0],
                          name="strict.json")
    assert "is not accepted (matchRepoDigestOrExact" in setup.error(artifact, strict)
    policy = write_policy(setup.home, signed_by_key(setup.home, type="matchRepository"),
                          key=setup.keys[0])
    digest, _ = serve_digest(setup, artifact, policy)
    assert digest == sha256(artifact_data)


def test_attachments_not_allowed_by_registries_d_means_no_signature(setup, artifact):
    sign(setup, artifact, setup.keys[0])
    (setup.home / ".config" / "containers" / "registries.d" / "default.yaml").unlink()
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    assert setup.refusal(policy, artifact, "A signature was required, but no signature "
                         "exists (registries.d does not set use-sigstore-attachments for it)") \
        in setup.error(artifact, policy)


# ------------------------------------------------------ already here

def test_a_warm_cache_is_verified_offline_and_refused_once_tightened(setup, containerdisk,
                                                                    disk_data):
    name = containerdisk("warm")
    sign(setup, name, setup.keys[0])
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    with serve(setup.lab, *setup.params(name, f"signature-policy={policy}"), "layer=disk",
               env=environment(setup.home), verbose=True) as server:
        assert export_digest(server.uri()) == sha256(disk_data)
        wait_for(lambda: KEPT in server.log(), 60, "the image was not kept whole")
    setup.proxy.stop()
    digest, log = serve_digest(setup, name, policy)
    assert digest == sha256(disk_data)
    assert "the kept signature of" in log
    tightened = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[1],
                             name="tightened.json")
    assert setup.refusal(tightened, name, "cryptographic signature verification failed: no "
                         f"key of the policy signed it (the cache {setup.cache}/oci), and "
                         "pull=never forbids reading its signatures from its registry") \
        in setup.error(name, tightened, "pull=never")
    rejecting = write_policy(setup.home, REJECT, name="rejecting.json")
    assert setup.refusal(rejecting, name, "the policy rejects it") in \
        setup.error(name, rejecting)


def test_an_image_in_podmans_storage_is_served_once_its_signature_verifies(
        setup, containerdisk, disk_data):
    registry = setup.lab.registry
    signed, unsigned = containerdisk("storage-signed"), containerdisk("storage-unsigned")
    for name in (signed, unsigned):
        podman("pull", "--quiet", "--tls-verify=false", f"{registry}/{name}")
    attach(registry, signed, [signature(setup.keys[0], manifest_digest(registry, signed),
                                        f"{registry}/{signed}")])
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    digest, log = serve_digest(setup, signed, policy, registry=registry)
    assert digest == sha256(disk_data)
    assert "from local storage" in log
    error = nbdkit_error(f"name={registry}/{unsigned}", f"cache={setup.cache}",
                         f"signature-policy={policy}", env=environment(setup.home))
    assert (f"{registry}/{unsigned}: rejected by the signature policy {policy} (default): "
            "A signature was required, but no signature exists") in error


# ------------------------------------------------ handed to podman, skopeo

def test_a_compressed_artifact_cdipy_cannot_read_lazily_is_checked_by_skopeo(
        setup, disk_data, tmp_path):
    # Not podman artifact pull, which takes no --signature-policy: the
    # system's policy here accepts anything.
    name = "cdi-test/sig-gzip-artifact:1"
    push_artifact(setup.lab.workdir, f"{setup.lab.registry}/{name}",
                  [Blob("application/vnd.kubevirt.disk.raw+gzip", gzip.compress(disk_data, 1),
                        "rootdisk")], **VM_EXPORT)
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    result = run_nbdkit(*setup.params(name, f"signature-policy={policy}"), verbose=True,
                        env=environment(setup.home))
    assert result.returncode != 0
    assert f"{setup.proxy.address}/{name}: copy with skopeo: " in result.stderr
    assert "Source image rejected" in result.stderr
    assert "running: podman artifact pull" not in result.stderr


GPG = [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/dev/null"}]


def test_signedBy_is_handed_to_podman(setup, containerdisk):
    name = containerdisk("gpg")
    policy = write_policy(setup.home, GPG)
    result = run_nbdkit(*setup.params(name, f"signature-policy={policy}"), verbose=True,
                        env=environment(setup.home))
    assert result.returncode != 0
    assert "fetched whole and verified by podman or skopeo" in result.stderr
    assert f"{setup.proxy.address}/{name}: pull: " in result.stderr
    assert "Source image rejected" in result.stderr
    assert_nothing_kept(setup.cache)


def test_signedBy_artifact_is_handed_to_skopeo(setup, artifact):
    policy = write_policy(setup.home, GPG)
    error = setup.error(artifact, policy)
    assert f"{setup.proxy.address}/{artifact}: copy with skopeo: " in error
    assert "Source image rejected" in error


# ------------------------------------------- what Debian 13's tools say

@pytest.mark.requires("sigstore")
def test_skopeo_agrees_with_the_signatures_made_here(setup, containerdisk, tmp_path):
    # The tests' own signatures are the real format: containers/image
    # accepts them, and refuses what cdi.py refuses.
    signed, unsigned = containerdisk("skopeo-signed"), containerdisk("skopeo-unsigned")
    registry = setup.lab.registry
    attach(registry, signed, [signature(setup.keys[0], manifest_digest(registry, signed),
                                        f"{registry}/{signed}")])
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])

    def skopeo_copy(name):
        return subprocess.run(
            ["skopeo", f"--policy={policy}", "copy", "--quiet", "--src-tls-verify=false",
             "--remove-signatures",
             f"docker://{registry}/{name}", f"oci:{tmp_path}/copy:{name.split('/')[-1]}"],
            check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL,
            env=environment(setup.home))

    accepted = skopeo_copy(signed)
    assert accepted.returncode == 0, accepted.stderr
    refused = skopeo_copy(unsigned)
    assert refused.returncode != 0
    assert "A signature was required, but no signature exists" in refused.stderr


@pytest.mark.requires("cosign")
def test_an_artifact_signed_by_cosign_is_verified(setup, artifact, artifact_data, tmp_path):
    # Straight to the registry: cosign pushes, which the test proxy does not.
    registry = setup.lab.registry
    digest = manifest_digest(registry, artifact)
    keys = {**os.environ, "COSIGN_PASSWORD": ""}
    for command in (["cosign", "generate-key-pair"],
                    ["cosign", "sign", "--key", "cosign.key", "--tlog-upload=false", "--yes",
                     "--allow-insecure-registry", "--allow-http-registry",
                     f"{registry}/{artifact.rpartition(':')[0]}@{digest}"]):
        result = subprocess.run(command, check=False, cwd=tmp_path, env=keys,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{command[:2]}: {result.stderr}"
    shutil.copy(tmp_path / "cosign.pub", setup.home / "key.pub")
    # cosign signs the repository alone: matchRepository accepts it.
    policy = write_policy(setup.home, signed_by_key(setup.home, type="matchRepository"))
    found, log = serve_digest(setup, artifact, policy, registry=registry)
    assert found == sha256(artifact_data)
    assert f"the signature of {digest} is verified" in log
    assert "as it is read" in log


@pytest.mark.requires("podman-artifact")
def test_an_artifact_in_podmans_store_is_served_once_its_signature_verifies(
        setup, artifact, artifact_data):
    registry = setup.lab.registry
    podman("artifact", "pull", "--tls-verify=false", f"{registry}/{artifact}")
    attach(registry, artifact, [signature(setup.keys[0], manifest_digest(registry, artifact),
                                          f"{registry}/{artifact}")])
    policy = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[0])
    digest, log = serve_digest(setup, artifact, policy, registry=registry)
    assert digest == sha256(artifact_data)
    assert "from podman's artifact store" in log
    other = write_policy(setup.home, signed_by_key(setup.home), key=setup.keys[1],
                         name="other.json")
    error = nbdkit_error(f"name={registry}/{artifact}", f"cache={setup.cache}",
                         f"signature-policy={other}", env=environment(setup.home))
    assert (f"{registry}/{artifact}: rejected by the signature policy {other} (default): "
            "cryptographic signature verification failed") in error
