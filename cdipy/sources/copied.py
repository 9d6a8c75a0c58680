"""The copy path as a source: an image's layers copied from "podman save"
into nameless files in a workspace, each hashed as it is copied."""

import contextlib
import logging
import threading

from ..errors import CdiError
from ..podman import Podman
from ..save import saved_layers
from ..workspace import Workspace
from . import Entry, Source

log = logging.getLogger("cdipy")


class SavedSource(Source):
    """The layers of IMAGE, podman's inspect record, copied when built."""

    def __init__(self, image, settings):
        diff_ids = image["RootFS"]["Layers"]
        super().__init__(settings.name, [Entry(index, diff_id)
                                         for index, diff_id in enumerate(diff_ids)],
                         f"image {image['Id']}")
        self.image = image
        self.verify = settings.verify != "false"
        self.local = threading.local()   # .podman: this thread's, in a session

    @contextlib.contextmanager
    def session(self):
        """podman for this thread's builds: the one lent, or an outer
        session's, else podman in a workspace of its own."""
        if getattr(self.local, "podman", None) is not None:
            yield
            return
        with Workspace(self.image_name) as workspace, self.lend(Podman(workspace,
                                                                       self.image_name)):
            yield

    @contextlib.contextmanager
    def lend(self, podman):
        before, self.local.podman = getattr(self.local, "podman", None), podman
        try:
            yield
        finally:
            self.local.podman = before

    def in_place(self, index):
        return False

    def build_in_place(self, index):
        return None

    def build(self, index, why="copy=true"):
        """Layer INDEX, copied; WHY it is copied, for the debug line."""
        diff_id = self.entries[index].digest
        with self.session():
            log.debug(f"layer {index}: {why}: copying the layer with podman save")
            layer = next(saved_layers(self.local.podman, self.image, [index], self.verify),
                         None)
        if layer is None:
            raise CdiError(f"{self.image_name}: save: podman's archive has no layer {diff_id}")
        layer.description = self.describe_layer(layer)
        return layer

    def pending(self, index, why="copy=true"):
        entry = self.entries[index]
        return (f"layer {index} of {len(self.entries)}: {entry.digest}: copied with "
                f"podman save when first opened ({why})")

    pending_disk = "the VM disk file, found when first opened (with podman save)"

    def read_members(self, indexes):
        """The layers of INDEXES, from one podman save; a layer that is
        twice in the image is in podman's archive once."""
        log.debug(f"layers {indexes} are not in storage: reading them with podman save")
        layers = {}
        try:
            with self.session():
                for layer in saved_layers(self.local.podman, self.image, indexes,
                                          self.verify):
                    layers[layer.index] = layer
        except BaseException:
            for layer in layers.values():
                layer.close()
            raise
        by_diff_id = {layer.digest: layer for layer in layers.values()}
        for index in indexes:
            diff_id = self.entries[index].digest
            if diff_id not in by_diff_id:
                for layer in layers.values():
                    layer.close()
                raise CdiError(f"{self.image_name}: save: podman's archive has no "
                               f"layer {diff_id}")
            layers.setdefault(index, by_diff_id[diff_id])
        for layer in layers.values():
            layer.description = self.describe_layer(layer)
        return layers
