"""The signature policy applied while the image is found (image.py): what
may be served from where it already is, what cdi.py verifies itself on
the way in, and what must be handed to podman or skopeo.

  accept  as if there were no policy
  reject  refused before anything is read, whatever the transport
  verify  a manifest read from the registry is verified before any of its
          blobs is read; an image or artifact already here (podman's
          storage, its artifact store, the cache) is served only if the
          signatures kept for its manifest pass the policy in force now,
          else those its registry holds (unless pull=never)
  hand    nothing already here is served as it is: podman pull (an
          image) or skopeo copy (an artifact, an archive) fetch it and
          verify it, whole
"""

import dataclasses
import logging

from .errors import CdiError, PolicyRefusal, RegistryError, Unsupported
from .parameters import local_reference, registry_host, split_transport
from .policy import docker_scopes, path_scopes, registries_d_attachments
from .reference import parse_reference

__all__ = ["Admission"]

log = logging.getLogger("cdipy")


class Admission:
    """The policy POLICY (a policy.SignaturePolicy) for settings.name, with
    the signatures that passed kept in RECORDS (a cache.PrivateCache)."""

    def __init__(self, policy, settings, records):
        self.settings, self.records = settings, records
        self.trust, self.reference = trust_of(policy, settings)
        self.how = self.trust.how
        if self.how != "accept":
            log.debug(f"{settings.name}: the signature policy {policy.path} asks for "
                      f"{self.trust.words()} ({self.trust.scope}): "
                      + {"reject": "refused", "verify": "verified by cdi.py",
                         "hand": "fetched whole and verified by podman or skopeo"}[self.how])
        if self.how == "reject":
            raise self.trust.refusal(self.trust.why or "the policy rejects it")

    def check_remote(self, registry, manifest_digest):
        """Verify the manifest MANIFEST_DIGEST just read from REGISTRY (an
        oci.registry.Registry), before any of its blobs is read: whatever
        goes wrong is a refusal, never a reason to fetch it another way."""
        if self.how != "verify":
            return
        try:
            self.checker().check_registry(registry, manifest_digest)
        except PolicyRefusal:
            raise
        except (CdiError, Unsupported) as error:
            raise self.trust.refusal(f"its signatures cannot be checked: {error}") from None

    def check_here(self, manifest_digests, where):
        """Whether what is already here (WHERE, in words), as one of
        MANIFEST_DIGESTS (podman holds several manifests of one image), may
        be served: always with accept; never with hand (the whole fetch
        verifies it); with verify, if the signatures kept for one of them,
        else its registry's, pass.  PolicyRefusal if none does."""
        if self.how == "accept":
            return True
        if self.how == "hand":
            log.debug(f"{self.settings.name}: not served from {where}: podman or skopeo "
                      "verify it on the way in")
            return False
        digests = [digest for digest in dict.fromkeys(manifest_digests) if digest]
        if not digests:
            raise self.trust.refusal(f"the manifest of the copy in {where} is not known")
        try:
            return self.check_here_signed(digests, where)
        except PolicyRefusal:
            raise
        except (CdiError, Unsupported) as error:
            raise self.trust.refusal(f"its signatures cannot be checked: {error}") from None

    def check_here_signed(self, digests, where):
        checker = self.checker()
        reasons = [checker.check_recorded(digest) for digest in digests]
        if None in reasons:
            return True
        if self.settings.pull == "never":
            raise self.trust.refusal(f"{reasons[-1]} ({where}), and pull=never forbids "
                                     "reading its signatures from its registry")
        log.debug(f"{self.settings.name}: {reasons[-1]}: reading its signatures from its "
                  "registry")
        registry = self.registry()
        for digest in digests[:-1]:
            try:
                checker.check_registry(registry, digest)
                return True
            except PolicyRefusal as refusal:
                log.debug(f"{self.settings.name}: manifest {digest}: {refusal}")
        checker.check_registry(registry, digests[-1])
        return True

    def checker(self):
        # Imported here: cryptography and the registry client are for
        # policies that ask for signatures alone.
        from .oci.signatures import SignatureCheck  # noqa: PLC0415
        image = self.reference
        if image.name_only():
            image = dataclasses.replace(image, tag="latest")
        return SignatureCheck(self.trust, image, self.records, registries_d_attachments(
            *docker_scopes(image.host, image.repository, image.tag, image.digest)))

    def registry(self):
        """A client of the image's registry, to read its signatures."""
        from .oci.registry import Registry  # noqa: PLC0415
        image = self.reference
        try:
            return Registry(image.host, image.repository, self.settings.name, self.settings,
                            image.digest or image.tag or "latest")
        except (Unsupported, RegistryError) as error:
            raise self.trust.refusal(f"its signatures cannot be read: {error}") from None


def trust_of(policy, settings):
    """(the policy's Trust for settings.name, its parsed Reference or None).

    A name with a registry is judged by its reference's scopes, parsed and
    normalized as containers/image does (index.docker.io is docker.io; a
    digest is the identity); an archive by its path's.  A short name is
    resolved by podman: if the policy sets scopes of its own for the
    docker transport, what podman resolves it to may fall under one, so
    nothing already here is served as it is and podman pulls and verifies
    it ("hand"), as it does when the policy asks for signatures, which
    only podman can find for a short name.  A name that is no reference
    cannot be placed in a scope: refused unless the policy accepts every
    docker image alike."""
    name = settings.name
    transport, rest = split_transport(name)
    if transport in ("oci", "oci-archive", "docker-archive", "dir"):
        path = rest.split(":", 1)[0] if transport != "dir" else rest
        return policy.trust(name, transport, *path_scopes(path)), None
    if transport == "docker-daemon":
        return policy.trust(name, transport, None, []), None
    return docker_trust(policy, name)


def docker_trust(policy, name):
    """trust_of for NAME, a name of the docker transport."""
    anywhere = policy.trust(name, "docker", None, [])
    uniform = not (policy.scopes("docker") - {""})
    if registry_host(name) is None:
        # Which registry holds its signatures is podman's to resolve too.
        if anywhere.how == "reject" or (uniform and anywhere.how == "accept"):
            return anywhere, None
        return dataclasses.replace(anywhere, how="hand"), None
    try:
        reference = parse_reference(local_reference(name))
    except ValueError:
        if uniform and anywhere.how == "accept":
            return anywhere, None
        return dataclasses.replace(anywhere, how="reject", why=(
            "it is not an image reference, so no scope of the policy can be told")), None
    return policy.trust(name, "docker", *docker_scopes(
        reference.host, reference.repository, reference.tag, reference.digest)), reference
