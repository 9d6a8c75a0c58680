"""podman's storage as a source: an image's layers served in place, each
rebuilt from its tar-split and its files (storage.py); a layer the storage
cannot serve is copied by the copy path instead, and says why."""

from ..errors import StorageUnavailable
from ..storage import storage_layer, storage_plans
from . import Source
from .copied import SavedSource


def podman_image_source(image, settings, maps, graph_root=None):
    """The source of IMAGE, podman's inspect record: in place from its
    storage (GRAPH_ROOT, which vfs images do not tell), else copied
    (copy=true)."""
    copies = SavedSource(image, settings)
    return copies if settings.copy else StorageSource(image, settings, maps, copies,
                                                      graph_root)


class StorageSource(Source):
    """The layers of IMAGE, podman's inspect record, in place in podman's
    storage (GRAPH_ROOT, which vfs images do not tell), their big maps kept
    in the PrivateCache MAPS; COPIES, the SavedSource of the same image,
    builds those storage cannot serve."""

    def __init__(self, image, settings, maps, copies, graph_root=None):
        super().__init__(settings.name, copies.entries, copies.what)
        self.maps = maps
        self.copies = copies
        count = len(self.entries)
        try:
            self.plans = storage_plans(image, graph_root)  # StoragePlan, or None: copy it
            self.not_in_storage = [None] * count            # why not, as a phrase
        except StorageUnavailable as reason:
            self.plans = [None] * count
            self.not_in_storage = [f"cannot serve from podman's storage ({reason})"] * count

    def session(self):
        return self.copies.session()

    def lend(self, podman):
        return self.copies.lend(podman)

    def in_place(self, index):
        return self.plans[index] is not None

    def build_in_place(self, index):
        plan = self.plans[index]
        if plan is None:
            return None
        try:
            layer = storage_layer(index, self.entries[index].digest, plan, self.image_name,
                                  self.maps)
        except StorageUnavailable as reason:
            self.plans[index] = None
            self.not_in_storage[index] = f"cannot serve from podman's storage ({reason})"
            return None
        layer.description = self.describe_layer(layer)
        return layer

    def build(self, index):
        return self.build_in_place(index) or self.copies.build(
            index, why=self.not_in_storage[index])

    def pending(self, index):
        return self.copies.pending(index, why=self.not_in_storage[index])

    @property
    def pending_disk(self):
        return self.copies.pending_disk

    def read_members(self, indexes):
        return self.copies.read_members(indexes)
