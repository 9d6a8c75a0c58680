"""An OCI layout as a source: the blobs of an artifact, or the layers of an
archive's image, in the cache's layout or in podman's artifact store.

An artifact's blobs are files: an ORAS disk (its name in the title
annotation, whatever its media type says), or the disks of a KubeVirt VM
export (VEP 256), as they are or gzipped.  An archive holds an image,
whose layers are served as tars, like podman's.  Everything is built, and
checked, when the source is made (under the layout's lock): a blob that
fails its check raises BlobMismatch, and finding the image (image.py)
fetches it again where the pull policy allows.
"""

import logging
import re

from ..disk import Choice, describe_file
from ..errors import CdiError
from ..layer import Member
from ..oci.blobs import Blobs
from ..oci.layout import IMAGE_CONFIG_TYPES
from ..progress import describe_size
from . import Entry, Source

log = logging.getLogger("cdipy")

TITLE = "org.opencontainers.image.title"
KUBEVIRT_DISK = "application/vnd.kubevirt.disk."
GZIPPED_DISK = "application/vnd.kubevirt.disk.raw+gzip"


class BlobSource(Source):
    """An artifact's blobs, as layers: what an artifact's sources share."""
    whole, part = "artifact", "blob"

    def __init__(self, image_name, what):
        super().__init__(image_name, [], what)
        self.layers, self.media_types, self.titles = [], [], []

    def add_blob(self, descriptor, count, layer, how):
        """Blob DESCRIPTOR of COUNT as LAYER, an entry also named by its
        title (if it can name an export); HOW it is served, in words."""
        index = len(self.layers)
        media_type = descriptor.get("mediaType", "")
        title = (descriptor.get("annotations") or {}).get(TITLE)
        layer.description = (f"blob {index} of {count}: {title or '(no title)'}, "
                             f"{media_type}, {descriptor['digest']}, {how}: "
                             f"{describe_file(layer)}")
        taken = {name for entry in self.entries for name in entry.names}
        names = (title,) if title and usable_name(title) and title not in taken else ()
        self.layers.append(layer)
        self.media_types.append(media_type)
        self.titles.append(title)
        self.entries.append(Entry(index, descriptor["digest"], names))

    def build(self, index):
        return self.layers[index]

    def choose_disk(self, layers):
        """The artifact's one disk blob, else its one blob."""
        disks = [index for index, media_type in enumerate(self.media_types)
                 if media_type.startswith(KUBEVIRT_DISK)] or list(range(len(self.layers)))
        if not disks:
            raise CdiError(f"{self.image_name}: the artifact has no blobs")
        if len(disks) > 1:
            names = ", ".join(self.entries[index].names[0] if self.entries[index].names
                              else str(index) for index in disks)
            raise CdiError(f"{self.image_name}: the artifact holds {len(disks)} disks: "
                           f"name one as the export: {names}")
        index = disks[0]
        why = f"the artifact's only {'disk' if len(disks) < len(self.layers) else 'blob'}"
        return Choice(index, Member(self.titles[index] or "(no title)", "file",
                                    self.layers[index].size, 0), why)

    def describe_disk(self, window):
        return self.layers[window.index].description

    def close(self):
        """Close every layer built (closing one twice is harmless)."""
        for layer in self.layers:
            layer.close()


class LayoutSource(BlobSource):
    """What FETCHED (an oci.fetch.Fetched) holds, checked unless
    settings.verify is false, the checks remembered in RECORDS;
    BlobMismatch if a blob fails its check."""

    def __init__(self, fetched, settings, records):
        super().__init__(settings.name, f"{settings.name} in {fetched.layout.path}")
        blobs = Blobs(fetched.layout, records, settings.verify != "false")
        blobs.fresh = fetched.fresh
        try:
            self.add_all(fetched, blobs)
        except BaseException:
            self.close()
            raise

    def add_all(self, fetched, blobs):
        config = fetched.manifest.get("config") or {}
        descriptors = fetched.manifest.get("layers") or []
        if config.get("mediaType") in IMAGE_CONFIG_TYPES:
            self.whole, self.part = "image", "layer"
            self.add_image_layers(fetched, blobs, descriptors)
        else:
            for descriptor in descriptors:
                if descriptor.get("mediaType") == GZIPPED_DISK:
                    layer = blobs.unpacked_layer(len(self.layers), descriptor)
                    how = f"gzip, unpacked in the cache to {describe_size(layer.size)}"
                else:
                    layer = blobs.blob_layer(len(self.layers), descriptor)
                    how = describe_size(layer.size)
                self.add_blob(descriptor, len(descriptors), layer, how)

    def add_image_layers(self, fetched, blobs, descriptors):
        """The layers of an image from an archive."""
        image_config = fetched.layout.json_blob(fetched.manifest["config"]["digest"])
        diff_ids = (image_config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(descriptors):
            raise CdiError(f"{self.image_name}: the image has {len(descriptors)} layers "
                           f"but its config lists {len(diff_ids)} diffIDs")
        self.entries = [Entry(index, diff_id) for index, diff_id in enumerate(diff_ids)]
        for index, (descriptor, diff_id) in enumerate(zip(descriptors, diff_ids)):
            layer = blobs.image_layer(index, descriptor, diff_id)
            layer.description = self.describe_layer(layer)
            self.layers.append(layer)

    def choose_disk(self, layers):
        """An image's: in its merged filesystem; an artifact's: its blob."""
        if self.whole == "image":
            return Source.choose_disk(self, layers)
        return super().choose_disk(layers)

    def describe_disk(self, window):
        if self.whole == "image":
            return Source.describe_disk(self, window)
        return super().describe_disk(window)


def usable_name(title):
    """Whether TITLE can name an export: not a number, a digest or "disk",
    which name exports already, and printable."""
    return (title.isprintable() and title != "disk" and 0 < len(title.encode()) <= 4096
            and not re.fullmatch(r"-?[0-9]+|sha256:.*", title))
