"""Sources: the ways of getting an image's layers, or an artifact's blobs,
as Layers.  The table of exports (exports.py) asks a source, and knows
nothing of podman, skopeo or layouts; finding the image (image.py) makes
the source, where it finds it.

The sources are in_place, copied, layout_blobs, lazy_artifact and
streamed_image, each described in the module map of docs/how-it-works.md.

Each offers what Source below does.  The table calls build,
build_in_place and read_members of an entry under that entry's export's
lock, and holds a session of the source (session()) across the builds
that choose the disk; a source that needs podman owns it, in a workspace
of its own, or the start-up's while start-up lends it (lend()).
"""

import contextlib
import dataclasses

from ..disk import choose_disk, describe_contents, describe_file
from ..progress import describe_size

# Where a layer's bytes are served from, in words, by Layer.served_from.
SERVED_FROM = {"storage": "in place from podman's storage", "copy": "from its copy",
               "cache": "from the cache", "artifact store": "in place from podman's artifact store",
               "registry": "from its registry as it arrives"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a source holds at INDEX: its DIGEST, and other NAMES it answers to."""
    index: int
    digest: str
    names: tuple = ()


class Source:
    """The interface, with what most sources share: an image's layers."""
    whole, part = "image", "layer"   # words for what it holds, and its entries

    def __init__(self, image_name, entries, what):
        self.image_name = image_name
        self.entries = entries    # [Entry], base first: one export each
        self.what = what          # what it found, for messages: "image ID"

    def session(self):
        """Hold what building needs across several builds of this thread."""
        return contextlib.nullcontext()

    def lend(self, podman):
        """Build with PODMAN (the start-up's, in its workspace) in this
        thread while held."""
        return contextlib.nullcontext()

    def in_place(self, index):
        """Whether entry INDEX is built from what is here: nothing copied or
        fetched, so that listing and the background may build it."""
        return True

    def build_in_place(self, index):
        """The Layer of entry INDEX if it can be built in place, else None."""
        return self.build(index)

    def build(self, index):
        """The Layer of entry INDEX, built now; CdiError if it cannot be."""
        raise NotImplementedError

    def pending(self, index):
        """What the export of entry INDEX will be, before it is built."""
        raise NotImplementedError

    def read_members(self, indexes):
        """{index: Layer} of INDEXES, entries not in place, built to see
        their members (a Layer may stand for two indexes)."""
        return {}

    def choose_disk(self, layers):
        """The disk.Choice among LAYERS, [(index, members)] of every entry."""
        return choose_disk(layers, self.image_name)

    pending_disk = "the VM disk file, found when first opened"

    def arriving_disk(self):
        """(Choice, its Window) of a source whose layers are still
        arriving, once the disk can be told (CdiError if there is none;
        OSError if what would tell cannot arrive); None: choose it from
        every entry's members (choose_disk)."""
        return None

    def describe_disk(self, window):
        """The description of the disk export, WINDOW."""
        return (f"{window.member.name} of layer {window.index} ({window.digest}), "
                f"{SERVED_FROM[window.served_from]}: {describe_file(window)}")

    def start_background(self):
        """Start what the source does in the background, once nbdkit has
        forked (threads do not survive a fork)."""

    def close(self):
        """Close what the source holds that no export does."""

    def describe_layer(self, layer):
        """The description of the export of LAYER, a tar, once built."""
        return (f"layer {layer.index} of {len(self.entries)}: {layer.digest}, "
                f"{describe_size(layer.size)}: {describe_contents(layer)}")
