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

import logging

from .errors import PolicyRefusal, RegistryError, Unsupported
from .parameters import local_reference, registry_host, split_transport
from .policy import docker_scopes, path_scopes, registries_d_attachments

__all__ = ["Admission"]

log = logging.getLogger("cdipy")


class Admission:
    """The policy POLICY (a policy.SignaturePolicy) for settings.name, with
    the signatures that passed kept in RECORDS (a cache.PrivateCache)."""

    def __init__(self, policy, settings, records):
        self.settings, self.records = settings, records
        self.trust = trust_of(policy, settings)
        self.how = self.trust.how
        if self.how != "accept":
            log.debug(f"{settings.name}: the signature policy {policy.path} asks for "
                      f"{self.trust.words()} ({self.trust.scope}): "
                      + {"reject": "refused", "verify": "verified by cdi.py",
                         "hand": "fetched whole and verified by podman or skopeo"}[self.how])
        if self.how == "reject":
            raise self.trust.refusal("the policy rejects it")

    def check_remote(self, registry, manifest_digest):
        """Verify the manifest MANIFEST_DIGEST just read from REGISTRY (an
        oci.registry.Registry), before any of its blobs is read."""
        if self.how != "verify":
            return
        self.checker().check_registry(registry, manifest_digest)

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
        from .oci.signatures import SignatureCheck, parse_reference  # noqa: PLC0415
        local = local_reference(self.settings.name)
        try:
            image = parse_reference(local)
        except ValueError:
            raise self.trust.refusal(f"{local!r} names no registry, so no signature "
                                     "can be found for it") from None
        if image.tag is None and image.digest is None:
            image = type(image)(image.name, "latest")
        return SignatureCheck(self.trust, image, self.records, self.attachments_enabled())

    def attachments_enabled(self):
        """Whether registries.d lets signatures be read from the image's
        repository, as containers/image decides."""
        from .oci.fetch import split_reference  # noqa: PLC0415
        host, repository, reference = split_reference(local_reference(self.settings.name))
        identity, namespaces = docker_scopes(host, repository, *tag_or_digest(reference))
        return registries_d_attachments(identity, namespaces)

    def registry(self):
        """A client of the image's registry, to read its signatures."""
        from .oci.fetch import split_reference  # noqa: PLC0415
        from .oci.registry import Registry  # noqa: PLC0415
        host, repository, reference = split_reference(local_reference(self.settings.name))
        try:
            return Registry(host, repository, self.settings.name, self.settings, reference)
        except (Unsupported, RegistryError) as error:
            raise self.trust.refusal(f"its signatures cannot be read: {error}") from None


def trust_of(policy, settings):
    """The policy's Trust for settings.name: a docker reference's scopes
    for a name with a registry, a file's for an archive; a short name or
    a local one only the docker transport's "" scope, or the default."""
    name = settings.name
    transport, rest = split_transport(name)
    if transport in ("oci", "oci-archive", "docker-archive", "dir"):
        path = rest.split(":", 1)[0] if transport != "dir" else rest
        return policy.trust(name, transport, *path_scopes(path))
    host = registry_host(name)
    if host is None:
        return policy.trust(name, "docker", None, [])
    from .oci.fetch import split_reference  # noqa: PLC0415
    host, repository, reference = split_reference(local_reference(name))
    return policy.trust(name, "docker", *docker_scopes(host, repository,
                                                       *tag_or_digest(reference)))


def tag_or_digest(reference):
    """(tag, digest) of a manifest REFERENCE, one of them None."""
    return (None, reference) if reference.startswith("sha256:") else (reference, None)
