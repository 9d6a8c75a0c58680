"""Finding the image: in local storage, or pulled, by the pull policy."""

import json
import logging
import re

from .errors import CdiError
from .parameters import local_reference, split_transport

log = logging.getLogger("cdipy")


def find_image(podman, settings):
    """Apply the pull policy; return the image's inspect record."""
    name = settings.name
    local = local_reference(name)
    local_only = settings.pull == "never" or split_transport(name)[0] == "containers-storage"
    if local is not None and (settings.pull != "always" or local_only):
        status, _ = podman.run(["image", "exists", "--", local],
                               "look up in local storage", ok_statuses=(0, 1))
        if status == 0:
            image = inspect_image(podman, local)
            if platform_matches(image, settings.platform):
                log.debug(f"using {image['Id']} from local storage")
                return image
            log.debug(f"local {name} is not {settings.platform}")
    if local_only:
        raise CdiError(f"{name}: image not found in local storage"
                       + (" (pull=never)" if settings.pull == "never" else ""))
    _, output = podman.run(["pull", "--quiet", *settings.registry_options(), "--", name],
                           "pull")
    # Refer to the pulled image by its ID: looking up a docker:// name
    # after pulling it fails (podman issue 20775).
    image_id = output.split()[-1] if output.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", image_id):
        raise CdiError(f"{name}: pull: podman printed no image ID: {output!r}")
    return inspect_image(podman, image_id)


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


def graph_root(podman):
    """Where podman keeps its storage."""
    _, output = podman.run(["info", "--format", "{{.Store.GraphRoot}}"], "info")
    return output.strip()
