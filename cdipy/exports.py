"""The set of exports: one per layer of the image, each built on first
use, in place from storage when it can be and copied when it must.

Exports holds the whole state of a running plugin.  Each export (a Slot)
has its own lock, held while that layer is built, so opening a ready export
never waits behind the building of another.
"""

import logging
import os
import re
import threading
import time

from .cache import PrivateCache
from .errors import CdiError, NoSuchExport, StorageUnavailable
from .image import find_image, graph_root
from .layer import Layer
from .podman import Podman
from .progress import describe_size
from .save import save_layers
from .storage import raise_open_file_limit, storage_layer, storage_plans
from .verify import CheckRecords, check_and_remember, remembered, start_check
from .workspace import Workspace

log = logging.getLogger("cdipy")


def prepare(settings):
    """Find the image and build its default export; return the Exports.
    The heavy work of start-up, done once before any client connects."""
    started = time.monotonic()
    raise_open_file_limit()
    with Workspace(settings.name, guard=True) as workspace:
        podman = Podman(workspace, settings.name)
        image = find_image(podman, settings)
        podman.space_needed = 2 * image.get("Size", 0)
        vfs = (image.get("GraphDriver") or {}).get("Name") == "vfs" and not settings.copy
        exports = Exports(settings, image, graph_root(podman) if vfs else None)
        log.debug(f"found image {image['Id']} ({len(exports.slots)} layers) in "
                  f"{time.monotonic() - started:.2f} s")
        try:
            exports.build_default(podman)
        except BaseException:
            exports.close()
            raise
    default = exports.slots[exports.default_index]
    log.debug(f"ready in {time.monotonic() - started:.2f} s")
    if settings.verify == "before" and default.layer.how == "storage":
        default.checked = True
        try:
            if not remembered(default.layer, exports.records):
                check_and_remember(default.layer, settings.name, exports.records)
        except BaseException:
            exports.close()
            raise
    return exports


class Slot:
    """One export: layer INDEX of the image, and what is known of it.  Its
    fields change only under lock; layer, checked and description are set
    once and may be read without it."""

    def __init__(self, index, diff_id, plan):
        self.index = index
        self.diff_id = diff_id
        self.lock = threading.Lock()
        self.layer = None           # the Layer, once built; then never changed
        self.plan = plan            # StoragePlan, or None: copy it
        self.not_in_storage = None  # why it must be copied, as a phrase
        self.failure = None         # why the last try to build it failed
        self.checked = False        # its digest check has started (or is done)
        self.check_thread = None    # the thread checking it, if any
        self.description = None     # made once: every client handshake asks


class Exports:
    def __init__(self, settings, image, graph_root=None):
        self.settings = settings
        self.image = image
        diff_ids = image["RootFS"]["Layers"]
        self.verifying = settings.verify != "false"
        cache = settings.cache_directory()
        self.records = CheckRecords(PrivateCache(os.path.join(cache, "checked")
                                                 if cache else None))
        self.maps = PrivateCache(os.path.join(cache, "maps") if cache else None)
        plans, why = [None] * len(diff_ids), "copy=true"
        if not settings.copy:
            try:
                plans = storage_plans(image, graph_root)
            except StorageUnavailable as reason:
                why = f"cannot serve from podman's storage ({reason})"
        # Made once, never changed: read without a lock.
        self.slots = tuple(Slot(index, diff_id, plan)
                           for index, (diff_id, plan) in enumerate(zip(diff_ids, plans)))
        for slot in self.slots:
            if slot.plan is None:
                slot.not_in_storage = why
        self.default_index = None

    # ----------------------------------------------------------- start-up

    def build_default(self, podman):
        """Build the default export (for layer=auto, the layers up to the one
        holding the VM disk) with PODMAN, the start-up's own."""
        count = len(self.slots)
        layer = self.settings.layer
        if layer == "auto":
            self.default_index = self.find_disk_layer(podman)
        elif -count <= layer < count:
            self.default_index = layer % count
            slot = self.slots[self.default_index]
            with slot.lock:
                self.build(slot, podman)
        else:
            allowed = f"0..{count - 1} or -{count}..-1" if count else "none"
            raise CdiError(f"{self.settings.name}: layer={layer} is out of range: the "
                           f"image has {count} layer{'s' if count != 1 else ''} "
                           f"(allowed: {allowed})")

    def find_disk_layer(self, podman):
        """The index of the first layer with a regular file under disk/."""
        index = 0
        while index < len(self.slots):
            slot = self.slots[index]
            with slot.lock:
                if slot.plan is not None:
                    self.build_from_storage(slot)
            if slot.layer is None:
                # Not in storage: one "podman save" looks through the layers
                # from here up to the next one that storage holds.
                run = [index]
                while run[-1] + 1 < len(self.slots) and self.slots[run[-1] + 1].plan is None:
                    run.append(run[-1] + 1)
                layer = save_layers(podman, self.image, run, self.verifying, keep=Layer.disks)
                if layer is None:
                    index = run[-1] + 1
                    continue
                slot = self.slots[layer.index]
                with slot.lock:
                    self.keep(slot, layer)
            if slot.layer.disks():
                return self.check_one_disk(slot.layer)
            log.debug(f"layer {slot.index} holds no disk/ file")
            index = slot.index + 1
        raise CdiError(f"{self.settings.name}: layer=auto: no layer holds a VM disk "
                       f"(a regular file under disk/); looked at {len(self.slots)} layers")

    def check_one_disk(self, layer):
        disks = layer.disks()
        if len(disks) > 1:
            raise CdiError(f"{self.settings.name}: layer=auto: layer {layer.index} holds "
                           f"{len(disks)} disks ({', '.join(d.name for d in disks)}): "
                           "pick one with layer=N and the tar filter's tar-entry=")
        return layer.index

    def build_in_background(self):
        """Map every layer that storage holds, in a thread: a client asking
        for one meanwhile waits for that one alone."""
        def run():
            for slot in self.slots:
                with slot.lock:
                    if slot.layer is None and slot.plan is not None:
                        try:
                            self.build_from_storage(slot)
                        except Exception as error:  # one layer's failure stops no other
                            log.debug(f"layer {slot.index}: {error}")
        threading.Thread(target=run, name="open-layers", daemon=True).start()

    # ------------------------------------------------------------ serving

    def find(self, name):
        """The Slot of export NAME: "" (the default), an index (negative
        from the top) or a diffID; None if there is none."""
        count = len(self.slots)
        if name == "":
            return self.slots[self.default_index]
        if re.fullmatch(r"0|-?[1-9][0-9]{0,19}", name) and -count <= int(name) < count:
            return self.slots[int(name) % count]
        return next((slot for slot in self.slots if slot.diff_id == name), None)

    def open(self, name):
        """The Layer of export NAME, built if it is not yet; starts its digest
        check.  Raises NoSuchExport if there is no such export, CdiError if
        it cannot be served."""
        slot = self.find(name)
        if slot is None:
            raise NoSuchExport(f"no export {name!r}: the exports are "
                              + ", ".join(self.names())
                              + " (or -1, -2, ... or a layer's diffID)")
        layer = slot.layer  # set once: a ready export needs no lock
        if layer is None or not slot.checked:
            with slot.lock:
                if slot.layer is None:
                    self.build(slot)
                layer = slot.layer
                if not slot.checked:
                    slot.checked = True
                    if self.verifying:
                        slot.check_thread = start_check(layer, self.settings.name,
                                                        self.records)
        return layer

    def names(self):
        return [str(slot.index) for slot in self.slots]

    def listing(self):
        """(name, description) of every export."""
        return [(str(slot.index), self.describe(slot)) for slot in self.slots]

    def describe(self, slot):
        """What export SLOT holds; a layer that storage holds is opened to
        tell, one that must be copied is not."""
        with slot.lock:
            if slot.layer is None and slot.plan is not None:
                self.build_from_storage(slot)
            if slot.description is not None:
                return slot.description
            head = f"layer {slot.index} of {len(self.slots)}: {slot.diff_id}"
            if slot.failure:
                return f"{head}: cannot be served: {slot.failure}"
            return (f"{head}: copied with podman save when first opened "
                    f"({slot.not_in_storage})")

    def close(self):
        """Close every layer; a check still reading one stops first."""
        for slot in self.slots:
            with slot.lock:
                if slot.layer is not None:
                    slot.layer.failure = "the server is stopping"  # ends its check
                    if slot.check_thread is not None:
                        slot.check_thread.join()
                    slot.layer.close()

    # ----------------------------------------------- building, under slot.lock

    def build(self, slot, podman=None):
        """Build SLOT's layer: from storage, else copied with PODMAN (by
        default, podman in a workspace of its own)."""
        if slot.plan is not None:
            self.build_from_storage(slot)
        if slot.layer is None and podman is None:
            with Workspace(self.settings.name) as workspace:
                self.build(slot, Podman(workspace, self.settings.name))
        elif slot.layer is None:
            log.debug(f"layer {slot.index}: {slot.not_in_storage}: "
                      "copying the layer with podman save")
            try:
                layer = save_layers(podman, self.image, [slot.index],
                                    self.verifying, keep=lambda layer: True)
                if layer is None:
                    raise CdiError(f"{self.settings.name}: save: podman's archive has no "
                                   f"layer {slot.diff_id}")
            except CdiError as error:
                slot.failure = str(error)
                raise
            self.keep(slot, layer)

    def build_from_storage(self, slot):
        try:
            self.keep(slot, storage_layer(slot.index, slot.diff_id, slot.plan,
                                          self.settings.name, self.maps))
        except StorageUnavailable as reason:
            slot.plan = None
            slot.not_in_storage = f"cannot serve from podman's storage ({reason})"
        except CdiError as error:
            slot.failure = str(error)
            raise

    def keep(self, slot, layer):
        slot.failure = None
        slot.checked = slot.checked or layer.how == "copy"  # checked while copied
        slot.description = (f"layer {slot.index} of {len(self.slots)}: {slot.diff_id}, "
                            f"{describe_size(layer.size)}: {layer.describe_contents()}")
        slot.layer = layer
        log.debug(f"export {slot.index}: {layer.how}: {slot.description}")
