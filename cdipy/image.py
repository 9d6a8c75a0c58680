"""Finding the image, and the source to serve it from, by the pull policy
and the signature policy: in podman's local storage, in
the cache (streamed there from its registry, see sources/streamed_image.py), or
pulled by podman (pull-into=podman, or what cdi.py cannot stream).  An
OCI artifact: in podman's artifact store (podman >= 5.4), pulled there by
podman; where podman has no artifact store (podman 4), or for a
multi-arch artifact, in the cache's layout, copied there by skopeo.  An
archive (which podman would import into the user's storage): in the
cache's layout, copied there by skopeo.  A blob of a layout that fails
its check is fetched again here, once, where the pull policy allows."""

import contextlib
import json
import logging
import re

from .errors import CdiError
from .oci.blobs import BlobMismatch
from .oci.fetch import (
    Fetched,
    copy,
    fetched,
    from_registry,
    inspect_remote,
    pull_artifact,
    stored_artifact,
)
from .oci.layout import Layout, is_artifact
from .parameters import local_reference, registry_host, split_transport
from .sources.in_place import podman_image_source
from .sources.layout_blobs import LayoutSource
from .sources.lazy_artifact import RegistrySource
from .sources.streamed_image import StreamSource

log = logging.getLogger("cdipy")

# Transports of files, which skopeo copies into the cache: podman would
# import them into the user's storage and leave them there.
FILE_TRANSPORTS = ("oci", "oci-archive", "docker-archive", "dir")
# The source of what the registry holds, read by cdi.py itself (oci.fetch).
REMOTE_SOURCES = {"artifact": RegistrySource, "image": StreamSource}
# How many times a blob that fails its check is fetched again.
REFETCHES = 1


def find_source(settings, *, podman, skopeo, held, admission, caches):
    """Apply the pull policy and the signature policy (ADMISSION, an
    admission.Admission, which refuses a rejected image already) to
    settings.name, with PODMAN and SKOPEO (podman.Tool); return the source
    (sources/) of what is found: an image in podman's storage, an artifact
    or archive in podman's artifact store or in the cache's layout (whose
    lock HELD, an ExitStack, then holds), or what cdi.py reads from the
    registry itself.  CACHES: (check records, maps)."""
    return Finder(settings, podman=podman, skopeo=skopeo, held=held, admission=admission,
                  caches=caches).find()


class Finder:
    """Finding settings.name, as find_source says."""

    def __init__(self, settings, *, podman, skopeo, held, admission, caches):
        self.podman, self.skopeo, self.settings = podman, skopeo, settings
        self.held, self.admission = held, admission
        self.records, self.maps = caches
        self.name = settings.name

    def find(self):
        settings, name = self.settings, self.name
        transport, _ = split_transport(name)
        if transport in FILE_TRANSPORTS:
            return self.copied_into_cache(name)
        local = local_reference(name)
        local_only = settings.pull == "never" or transport == "containers-storage"
        if local is not None and (settings.pull != "always" or local_only):
            found = self.local(local)
            if found is not None:
                return found
        if local_only:
            if self.admission.how == "hand":
                raise self.admission.trust.refusal(
                    "only podman or skopeo can verify what it asks for, on a pull, which "
                    + ("pull=never forbids" if settings.pull == "never" else
                       "containers-storage: does not make"))
            raise CdiError(f"{name}: image not found in local storage"
                           + (" nor in the cache (pull=never)" if settings.pull == "never"
                              else ""))
        return self.pull(local)

    def local(self, local):
        """The image LOCAL in podman's storage, else the artifact in podman's
        artifact store or in the cache, if the signature policy lets it be
        served from there; None if none holds it, or it may not."""
        settings, admission = self.settings, self.admission
        status, _ = self.podman.run(["image", "exists", "--", local],
                                    "look up in local storage", ok_statuses=(0, 1))
        if status == 0:
            image = inspect_image(self.podman, local)
            if not platform_matches(image, settings.platform):
                log.debug(f"local {self.name} is not {settings.platform}")
            elif admission.check_here(manifest_digests(image, local), "podman's storage"):
                log.debug(f"using {image['Id']} from local storage")
                return self.podman_source(image)
            else:
                return None
        if split_transport(self.name)[0] == "containers-storage":
            return None  # names podman's image storage alone
        stored = stored_artifact(self.podman, settings, local)
        if stored is not None:
            return self.layout_source(stored) \
                if admission.check_here([stored.digest], "podman's artifact store") else None
        found = cached(settings, self.held, admission)
        if found is None:
            return None
        layout, manifest = found
        log.debug(f"using the artifact {self.name} from the cache {layout.path}")
        remote = f"docker://{local}"
        fetch = None if settings.pull == "never" else \
            lambda: copy(self.skopeo, settings, layout, remote)
        return self.layout_source(Fetched(self.name, layout, manifest, fetch))

    def pull(self, local):
        """Fetch the image: an artifact of uncompressed blobs read from its
        registry as it is read, an image of gzip layers streamed into the
        cache (pull-into=cache); another artifact with podman artifact pull
        where podman can, else with skopeo into the cache; another image
        with podman pull.  What the signature policy hands to podman and
        skopeo is never read by cdi.py itself; an artifact cdi.py does not
        read itself goes to skopeo unless the policy accepts anything
        (podman artifact pull takes no --signature-policy)."""
        settings, name, how = self.settings, self.name, self.admission.how
        if local is not None and registry_host(name) is not None:
            if settings.cache_directory() is not None and how != "hand":
                read = from_registry(settings, local, layout_of(settings), self.admission)
                if read is not None:
                    return REMOTE_SOURCES[read.kind](read, settings, self.records)
            manifest = inspect_remote(self.skopeo, settings, f"docker://{local}")
            if manifest is not None and is_artifact(manifest):
                # podman artifact pull takes no platform: an index goes to
                # skopeo; nor a signature policy.
                pulled = None if "manifests" in manifest or how != "accept" \
                    else pull_artifact(self.podman, settings, local)
                if pulled is not None:
                    return self.layout_source(pulled)
                log.debug(f"{name} is an artifact: copying it with skopeo")
                return self.copied_into_cache(f"docker://{local}")
        _, output = self.podman.run(["pull", "--quiet", *settings.registry_options(),
                                     *settings.policy_options("podman"), "--", name], "pull")
        # Refer to the pulled image by its ID: looking up a docker:// name
        # after pulling it fails (podman issue 20775).
        image_id = output.split()[-1] if output.split() else ""
        if not re.fullmatch(r"[0-9a-f]{64}", image_id):
            raise CdiError(f"{name}: pull: podman printed no image ID: {output!r}")
        return self.podman_source(inspect_image(self.podman, image_id))

    def copied_into_cache(self, source):
        """SOURCE copied by skopeo into the cache's layout, locked by HELD."""
        layout = self.held.enter_context(layout_of(self.settings).locked())
        return self.layout_source(fetched(
            layout, self.name, lambda: copy(self.skopeo, self.settings, layout, source)))

    def podman_source(self, image):
        """The source of IMAGE, podman's inspect record."""
        vfs = (image.get("GraphDriver") or {}).get("Name") == "vfs"
        return podman_image_source(image, self.settings, self.maps,
                                   self.podman.graph_root() if vfs else None)

    def layout_source(self, found):
        return layout_source(found, self.settings, self.records)


def layout_source(found, settings, records):
    """The LayoutSource of FOUND (an oci.fetch.Fetched); a blob that fails
    its check is fetched again, REFETCHES times, where the pull policy
    allows."""
    for attempt in range(REFETCHES + 1):
        try:
            return LayoutSource(found, settings, records)
        except BlobMismatch as error:
            if found.fetch is None or attempt == REFETCHES:
                advice = ("pull=never forbids fetching it again: pass pull=missing"
                          if settings.pull == "never" else found.layout.advice_on_damage())
                raise CdiError(f"{error}; {advice}") from None
            log.debug(f"{error}: fetching it again")
            found.layout.remove_blob(error.digest)
            found.fetch_again()
    raise AssertionError("unreachable")


def cached(settings, held, admission):
    """(the cache's layout, locked by HELD, the manifest there) if it holds
    the artifact settings.name and the signature policy (ADMISSION) lets it
    be served from there; else None."""
    if settings.cache_directory() is None:
        return None
    layout = layout_of(settings)
    if not layout.has_index():
        return None
    with contextlib.ExitStack() as lock:
        lock.enter_context(layout.locked())
        found = layout.manifest(settings.name)
        if found is None or not admission.check_here([found[0]], f"the cache {layout.path}"):
            return None
        held.enter_context(lock.pop_all())
        return layout, found[1]


def layout_of(settings):
    return Layout(settings.cache_directory(), settings.name, settings.platform)


def inspect_image(podman, reference):
    _, output = podman.run(["image", "inspect", "--", reference], "inspect")
    try:
        return json.loads(output)[0]
    except (ValueError, IndexError, KeyError):
        raise CdiError(f"{podman.image_name}: inspect: podman printed "
                       f"unexpected output: {output[:200]!r}") from None


def manifest_digests(image, local):
    """The digests of the manifests podman holds for IMAGE (an inspect
    record) as pulled under LOCAL's repository, then its own Digest."""
    repository = re.sub(r"(:[^/:]*)?(@.*)?$", "", local)
    return [entry.split("@", 1)[1] for entry in image.get("RepoDigests") or []
            if entry.split("@", 1)[0] == repository] + [image.get("Digest")]


def platform_matches(image, platform):
    if platform is None:
        return True
    wanted = platform.split("/")
    actual = [image.get("Os", ""), image.get("Architecture", ""),
              image.get("Variant", "")][:len(wanted)]
    return actual == wanted
