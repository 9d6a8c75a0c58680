"""Artifacts and archives: what podman cannot pull, or should not import,
copied with skopeo into the cache's OCI layout and served from there.

An artifact's blobs are files: an ORAS disk (its name in the title
annotation, whatever its media type says), or the disks of a KubeVirt VM
export (VEP 256), as they are or gzipped.  A warm start of an artifact
reads the layout alone: no network, no copy.  An archive holds an image,
whose layers are served as from podman's storage; it is copied again at
each start (skopeo then writes only the blobs the layout lacks).
"""

import dataclasses
import json
import logging
import re

from .blobs import BlobMismatch, Blobs
from .disk import choose_disk
from .errors import CdiError
from .layout import IMAGE_CONFIG_TYPES
from .progress import describe_size

log = logging.getLogger("cdipy")

TITLE = "org.opencontainers.image.title"
KUBEVIRT_DISK = "application/vnd.kubevirt.disk."
GZIPPED_DISK = "application/vnd.kubevirt.disk.raw+gzip"
# How many times a blob that fails its check is fetched again.
REFETCHES = 1


@dataclasses.dataclass
class Fetched:
    """IMAGE_NAME in LAYOUT (held locked) as the MANIFEST there; FETCH, if
    the pull policy allows, copies it again (for a damaged blob) and
    returns the manifest; FRESH, the digests of the blobs skopeo has just
    written (and checked)."""
    image_name: str
    layout: object
    manifest: dict
    fetch: object = None
    fresh: set = dataclasses.field(default_factory=set)

    def fetch_again(self):
        before = set(self.layout.blobs())
        self.manifest = self.fetch()
        self.fresh |= set(self.layout.blobs()) - before


def inspect_remote(skopeo, settings, source):
    """The manifest (or index) of SOURCE, a docker:// name; None if skopeo
    cannot tell (podman's pull then says why, as for any image)."""
    try:
        _, output = skopeo.run(["inspect", "--raw", *settings.registry_options(platform=False),
                                "--", source], "inspect")
        return json.loads(output)
    except (CdiError, ValueError) as error:
        log.debug(f"cannot read the manifest of {source} with skopeo: {error}")
        return None


def copy(skopeo, settings, layout, source):
    """Copy SOURCE into LAYOUT (locked); return its manifest there.  Blobs
    the layout holds already are not fetched again; the ones skopeo
    writes, it has checked."""
    skopeo.run([*settings.platform_options(), "copy", "--quiet",
                "--dest-oci-accept-uncompressed-layers",
                *(settings.registry_options("src-", platform=False)
                  if source.startswith("docker://") else []),
                "--", source, layout.destination(settings.name)], "copy with skopeo")
    found = layout.manifest(settings.name)
    if found is None:
        raise CdiError(f"{settings.name}: copy with skopeo: no manifest in {layout.path}")
    return found[1]


def layout_exports(exports, fetched):
    """Fill EXPORTS with the layers, or blobs, of FETCHED; a blob that fails
    its check is fetched again (once)."""
    settings = exports.settings
    blobs = Blobs(fetched.layout, exports.records, exports.verifying)
    for attempt in range(REFETCHES + 1):
        blobs.fresh = fetched.fresh
        try:
            return add_exports(exports, fetched, blobs)
        except BlobMismatch as error:
            exports.clear()
            if fetched.fetch is None or attempt == REFETCHES:
                advice = ("pull=never forbids fetching it again: pass pull=missing"
                          if settings.pull == "never" else fetched.layout.advice_on_damage())
                raise CdiError(f"{error}; {advice}") from None
            log.debug(f"{error}: fetching it again")
            fetched.layout.remove_blob(error.digest)
            fetched.fetch_again()
        except BaseException:
            exports.close()
            raise
    raise AssertionError("not reached")


def add_exports(exports, fetched, blobs):
    manifest = fetched.manifest
    config = manifest.get("config") or {}
    layers = manifest.get("layers") or []
    exports.image_config = config.get("mediaType") in IMAGE_CONFIG_TYPES
    if exports.image_config:
        add_image(exports, fetched, blobs, layers)
    else:
        add_artifact(exports, fetched, blobs, layers)
    exports.build_default()  # all is built: this only chooses


def add_image(exports, fetched, blobs, descriptors):
    """The layers of an image from an archive, and its disk."""
    image_config = fetched.layout.json_blob(fetched.manifest["config"]["digest"])
    diff_ids = (image_config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(descriptors):
        raise CdiError(f"{fetched.image_name}: the image has {len(descriptors)} layers "
                       f"but its config lists {len(diff_ids)} diffIDs")
    for index, (descriptor, diff_id) in enumerate(zip(descriptors, diff_ids)):
        slot = exports.add_slot(index, diff_id)
        exports.keep(slot, blobs.image_layer(index, descriptor, diff_id))
    try:
        choice = choose_disk([(slot.index, slot.layer.members) for slot in exports.slots],
                             fetched.image_name)
    except CdiError as error:
        exports.disk_error = str(error)
        return
    slot = exports.slots[choice.index]
    exports.keep_disk(slot.layer.window(choice.member, choice.why))
    exports.disk.checked = True


def add_artifact(exports, fetched, blobs, descriptors):
    """One export per blob, also named by its title; the disk among them."""
    count = len(descriptors)
    for index, descriptor in enumerate(descriptors):
        media_type = descriptor.get("mediaType", "")
        title = (descriptor.get("annotations") or {}).get(TITLE)
        if media_type == GZIPPED_DISK:
            layer = blobs.unpacked_layer(index, descriptor)
            how = f"gzip, unpacked in the cache to {describe_size(layer.size)}"
        else:
            layer = blobs.blob_layer(index, descriptor)
            how = describe_size(layer.size)
        slot = exports.add_slot(index, descriptor["digest"])
        slot.title, slot.media_type = title, media_type
        exports.keep(slot, layer, f"blob {index} of {count}: {title or '(no title)'}, "
                                  f"{media_type}, {descriptor['digest']}, {how}: "
                                  f"{layer.describe_file()}")
        if title and usable_name(title) and title not in exports.aliases:
            exports.aliases[title] = slot
    disks = [slot for slot in exports.slots if slot.media_type.startswith(KUBEVIRT_DISK)]
    disks = disks or exports.slots
    if len(disks) == 1:
        exports.disk = disks[0]
        log.debug(f"export disk: blob {disks[0].index} ({disks[0].title or 'no title'}), "
                  f"the artifact's only {'disk' if len(disks) < count else 'blob'}")
    elif not disks:
        exports.disk_error = f"{fetched.image_name}: the artifact has no blobs"
    else:
        names = ", ".join(slot.title if exports.aliases.get(slot.title) is slot else slot.name
                          for slot in disks)
        exports.disk_error = (f"{fetched.image_name}: the artifact holds {len(disks)} "
                              f"disks: name one as the export: {names}")


def usable_name(title):
    """Whether TITLE can name an export: not a number, a digest or "disk",
    which name exports already, and printable."""
    return (title.isprintable() and title != "disk" and 0 < len(title.encode()) <= 4096
            and not re.fullmatch(r"-?[0-9]+|sha256:.*", title))
