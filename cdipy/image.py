"""Finding the image, by the pull policy: in podman's local storage, in
the cache (streamed there from its registry, see sources/stream.py), or
pulled by podman (pull-into=podman, or what cdi.py cannot stream).  An
OCI artifact: in podman's artifact store (podman >= 5.4), pulled there by
podman; where podman has no artifact store (podman 4), or for a
multi-arch artifact, in the cache's layout, copied there by skopeo.  An
archive (which podman would import into the user's storage): in the
cache's layout, copied there by skopeo."""

import contextlib
import json
import logging
import os
import re

from .errors import CdiError
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

log = logging.getLogger("cdipy")

# Transports of files, which skopeo copies into the cache: podman would
# import them into the user's storage and leave them there.
FILE_TRANSPORTS = ("oci", "oci-archive", "docker-archive", "dir")


def find_image(podman, skopeo, settings, held):
    """Apply the pull policy; return podman's inspect record of the image,
    or a Fetched: an artifact or archive in podman's artifact store or in
    the cache's layout, whose lock HELD (an ExitStack) then holds."""
    name = settings.name
    transport, _ = split_transport(name)
    if transport in FILE_TRANSPORTS:
        layout = held.enter_context(layout_of(settings).locked())
        return fetched(layout, name, lambda: copy(skopeo, settings, layout, name))
    local = local_reference(name)
    local_only = settings.pull == "never" or transport == "containers-storage"
    if local is not None and (settings.pull != "always" or local_only):
        found = find_local(podman, skopeo, settings, held, local)
        if found is not None:
            return found
    if local_only:
        raise CdiError(f"{name}: image not found in local storage"
                       + (" nor in the cache (pull=never)" if settings.pull == "never" else ""))
    return pull(podman, skopeo, settings, held, local)


def find_local(podman, skopeo, settings, held, local):
    """The image LOCAL in podman's storage, else the artifact in podman's
    artifact store or in the cache; None if none holds it."""
    name = settings.name
    status, _ = podman.run(["image", "exists", "--", local],
                           "look up in local storage", ok_statuses=(0, 1))
    if status == 0:
        image = inspect_image(podman, local)
        if platform_matches(image, settings.platform):
            log.debug(f"using {image['Id']} from local storage")
            return image
        log.debug(f"local {name} is not {settings.platform}")
    if split_transport(name)[0] == "containers-storage":
        return None  # names podman's image storage alone
    stored = stored_artifact(podman, settings, local)
    if stored is not None:
        return stored
    found = cached(settings, held)
    if found is None:
        return None
    layout, manifest = found
    log.debug(f"using the artifact {name} from the cache {layout.path}")
    remote = f"docker://{local}"
    fetch = None if settings.pull == "never" else lambda: copy(skopeo, settings, layout, remote)
    return Fetched(name, layout, manifest, fetch)


def pull(podman, skopeo, settings, held, local):
    """Fetch the image: an artifact of uncompressed blobs read from its
    registry as it is read, an image of gzip layers streamed into the cache
    (pull-into=cache); another artifact with podman artifact pull where
    podman can, else with skopeo into the cache; another image with podman
    pull."""
    name = settings.name
    remote = f"docker://{local}"
    if local is not None and registry_host(name) is not None:
        if settings.cache_directory() is not None:
            read = from_registry(settings, local, layout_of(settings))
            if read is not None:
                return read
        manifest = inspect_remote(skopeo, settings, remote)
        if manifest is not None and is_artifact(manifest):
            # podman artifact pull takes no platform: an index goes to skopeo.
            pulled = None if "manifests" in manifest else pull_artifact(podman, settings, local)
            if pulled is not None:
                return pulled
            log.debug(f"{name} is an artifact: copying it with skopeo")
            layout = held.enter_context(layout_of(settings).locked())
            return fetched(layout, name, lambda: copy(skopeo, settings, layout, remote))
    _, output = podman.run(["pull", "--quiet", *settings.registry_options(), "--", name],
                           "pull")
    # Refer to the pulled image by its ID: looking up a docker:// name
    # after pulling it fails (podman issue 20775).
    image_id = output.split()[-1] if output.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", image_id):
        raise CdiError(f"{name}: pull: podman printed no image ID: {output!r}")
    return inspect_image(podman, image_id)


def cached(settings, held):
    """(the cache's layout, locked by HELD, the manifest there) if it holds
    the artifact settings.name; else None."""
    directory = settings.cache_directory()
    if directory is None or not os.path.exists(os.path.join(directory, "oci", "index.json")):
        return None
    with contextlib.ExitStack() as lock:
        layout = lock.enter_context(layout_of(settings).locked())
        found = layout.manifest(settings.name)
        if found is None:
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


def platform_matches(image, platform):
    if platform is None:
        return True
    wanted = platform.split("/")
    actual = [image.get("Os", ""), image.get("Architecture", ""),
              image.get("Variant", "")][:len(wanted)]
    return actual == wanted
