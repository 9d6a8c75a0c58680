"""The set of exports: one per layer of the image (or blob of the
artifact), and "disk", the VM disk file itself.  A layer of an image in
podman's storage is built on first use, in place from storage when it can
be and copied when it must; one from the cache is ready from the start.

Exports holds the whole state of a running plugin.  Each export (a Slot)
has its own lock, held while that layer is built, so opening a ready export
never waits behind the building of another.
"""

import contextlib
import logging
import os
import re
import threading
import time

from .artifact import Fetched, layout_exports
from .cache import PrivateCache
from .disk import choose_disk, is_candidate
from .errors import CdiError, NoSuchExport, StorageUnavailable
from .image import find_image, graph_root
from .podman import Podman, Skopeo
from .progress import describe_size
from .save import saved_layers
from .storage import raise_open_file_limit, storage_layer, storage_plans
from .verify import CheckRecords, check_and_remember, remembered, start_check
from .workspace import Workspace

log = logging.getLogger("cdipy")


def prepare(settings):
    """Find the image and build its default export; return the Exports.
    The heavy work of start-up, done once before any client connects."""
    started = time.monotonic()
    raise_open_file_limit()
    # The cache's lock (in HELD) outlives the workspace: skopeo is stopped
    # before another nbdkit may write the cache.
    with contextlib.ExitStack() as held, Workspace(settings.name, guard=True) as workspace:
        podman = Podman(workspace, settings.name)
        found = find_image(podman, Skopeo(workspace, settings.name), settings, held)
        if isinstance(found, Fetched):
            exports = Exports(settings, None)
            layout_exports(exports, found)
            log.debug(f"ready in {time.monotonic() - started:.2f} s")
            return exports
        image = found
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
    default = exports.find("")
    if default is exports.disk:
        default = exports.slots[default.layer.index]  # whose check covers the disk
    log.debug(f"ready in {time.monotonic() - started:.2f} s")
    if settings.verify == "before" and default.layer.how == "storage" and not default.checked:
        default.checked = True
        try:
            if not remembered(default.layer, exports.records):
                check_and_remember(default.layer, settings.name, exports.records)
        except BaseException:
            exports.close()
            raise
    return exports


class Slot:
    """One export: layer INDEX of the image (or, with the name "disk", the
    VM disk file), and what is known of it.  Its fields change only under
    lock; layer, checked and description are set once and may be read
    without it."""

    def __init__(self, index, diff_id, plan, name=None):
        self.index = index
        self.diff_id = diff_id
        self.name = str(index) if name is None else name
        self.lock = threading.Lock()
        self.layer = None           # the Layer, once built; then never changed
        self.plan = plan            # StoragePlan, or None: copy it
        self.not_in_storage = None  # why it must be copied, as a phrase
        self.failure = None         # why the last try to build it failed
        self.checked = False        # its digest check has started (or is done)
        self.check_thread = None    # the thread checking it, if any
        self.description = None     # made once: every client handshake asks
        self.title = None           # an artifact's blob: its title annotation
        self.media_type = ""        # an artifact's blob: its media type


class Exports:
    """The exports of IMAGE, podman's inspect record (the storage at
    GRAPH_ROOT, for vfs); with IMAGE None, layout_exports adds them."""

    def __init__(self, settings, image, graph_root=None):
        self.settings = settings
        self.image = image
        diff_ids = image["RootFS"]["Layers"] if image else []
        self.verifying = settings.verify != "false"
        cache = settings.cache_directory()
        self.records = CheckRecords(PrivateCache(os.path.join(cache, "checked")
                                                 if cache else None))
        self.maps = PrivateCache(os.path.join(cache, "maps") if cache else None)
        plans, why = [None] * len(diff_ids), "copy=true"
        if image and not settings.copy:
            try:
                plans = storage_plans(image, graph_root)
            except StorageUnavailable as reason:
                why = f"cannot serve from podman's storage ({reason})"
        # Made here, or by layout_exports before serving: read without a lock.
        self.slots = [Slot(index, diff_id, plan)
                      for index, (diff_id, plan) in enumerate(zip(diff_ids, plans))]
        for slot in self.slots:
            if slot.plan is None:
                slot.not_in_storage = why
        self.disk = Slot(None, None, None, name="disk")
        self.disk_error = None    # why there is no one disk, once known
        self.aliases = {}         # other names of slots: the titles of blobs
        self.default_index = None  # the default export: an index, or "disk"
        self.image_config = image is not None  # False: an artifact's blobs

    # ----------------------------------------------------------- start-up

    def build_default(self, podman=None):
        """Build the default export (for layer=auto and layer=disk, with the
        layers that decide which file is the VM disk) with PODMAN, the
        start-up's own."""
        count = len(self.slots)
        layer = self.settings.layer
        if layer in ("auto", "disk"):
            with self.disk.lock:
                self.build_disk(podman)
            self.default_index = self.disk.layer.index if layer == "auto" else "disk"
        elif -count <= layer < count:
            self.default_index = layer % count
            slot = self.slots[self.default_index]
            with slot.lock:
                self.build(slot, podman)
        else:
            allowed = f"0..{count - 1} or -{count}..-1" if count else "none"
            whole, part = ("image", "layer") if self.image_config else ("artifact", "blob")
            raise CdiError(f"{self.settings.name}: layer={layer} is out of range: the "
                           f"{whole} has {count} {part}{'s' if count != 1 else ''} "
                           f"(allowed: {allowed})")

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
        from the top), "disk", a blob's title or a diffID; None if there
        is none."""
        count = len(self.slots)
        if name == "":
            name = str(self.default_index)
        if name == "disk":
            return self.disk
        if name in self.aliases:
            return self.aliases[name]
        if re.fullmatch(r"0|-?[1-9][0-9]{0,19}", name) and -count <= int(name) < count:
            return self.slots[int(name) % count]
        return next((slot for slot in self.slots if slot.diff_id == name), None)

    def open(self, name):
        """The Layer of export NAME, built if it is not yet; starts its digest
        check.  Raises NoSuchExport if there is no such export, CdiError if
        it cannot be served."""
        slot = self.find(name)
        if slot is None:
            self.describe_disk()  # then "disk" is named only if there is one
            raise NoSuchExport(f"no export {name!r}: the exports are "
                              + ", ".join(self.names())
                              + " (or -1, -2, ... or a layer's diffID)")
        if slot is self.disk and self.disk_error:
            raise NoSuchExport(self.disk_error)
        if slot is self.disk and (slot.layer is None or not slot.checked):
            # The disk's bytes are its layer's: that layer's check covers them.
            with slot.lock:
                if slot.layer is None:
                    self.build_disk()
            self.open(str(slot.layer.index))
            slot.checked = True
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
        names = [slot.name for slot in self.slots] + list(self.aliases)
        return names + ([] if self.disk_error else ["disk"])

    def listing(self):
        """(name, description) of every export; "disk" only once it is found
        (nbdinfo --list opens every export listed): on the copy path, it
        may be opened before."""
        listed = [(name, self.describe(self.find(name))) for name in self.names()]
        return [(name, description) for name, description in listed
                if name != "disk" or self.disk.layer is not None]

    def describe(self, slot):
        """What export SLOT holds; a layer that storage holds is opened to
        tell, one that must be copied is not."""
        if slot is self.disk:
            return self.describe_disk()
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

    def add_slot(self, index, diff_id):
        """A new export for layer or blob INDEX, whose digest is DIFF_ID."""
        slot = Slot(index, diff_id, None)
        self.slots.append(slot)
        return slot

    def clear(self):
        """Close and forget every export, to add them again."""
        self.close()
        self.slots.clear()
        self.aliases.clear()
        self.disk = Slot(None, None, None, name="disk")
        self.disk_error = None

    def describe_disk(self):
        """What the disk export holds; found now if every layer it depends
        on is in storage, otherwise when first opened."""
        with self.disk.lock:
            if self.disk.layer is None and not self.disk_error \
                    and all(slot.plan is not None or slot.layer for slot in self.slots):
                with contextlib.suppress(CdiError):  # then disk_error says why
                    self.build_disk()
            if self.disk.description is not None:
                return self.disk.description
            if self.disk_error:
                return f"no VM disk: {self.disk_error}"
            return "the VM disk file, found when first opened (with podman save)"

    def close(self):
        """Close every layer; a check still reading one stops first."""
        for slot in [self.disk, *self.slots]:
            with slot.lock:
                if slot.layer is not None and slot.layer.sources:
                    slot.layer.fail("the server is stopping")  # ends its check
                    if slot.check_thread is not None:
                        slot.check_thread.join()
                    slot.layer.close()

    # ----------------------------------------------- building, under slot.lock

    def build(self, slot, podman=None):
        """Build SLOT's layer: from storage, else copied with PODMAN (by
        default, podman in a workspace of its own)."""
        if slot is self.disk:
            return self.build_disk(podman)
        if slot.layer is None and slot.plan is not None:
            self.build_from_storage(slot)
        if slot.layer is None and podman is None:
            with Workspace(self.settings.name) as workspace:
                self.build(slot, Podman(workspace, self.settings.name))
        elif slot.layer is None:
            log.debug(f"layer {slot.index}: {slot.not_in_storage}: "
                      "copying the layer with podman save")
            try:
                layer = next(saved_layers(podman, self.image, [slot.index], self.verifying),
                             None)
                if layer is None:
                    raise CdiError(f"{self.settings.name}: save: podman's archive has no "
                                   f"layer {slot.diff_id}")
            except CdiError as error:
                slot.failure = str(error)
                raise
            self.keep(slot, layer)

    def build_disk(self, podman=None):
        """Build the disk export: the file the VM would boot, in the merged
        filesystem of the layers, as a window onto its layer."""
        if self.disk_error:
            raise CdiError(self.disk_error)
        if self.disk.layer is not None:
            return
        if podman is None:
            with Workspace(self.settings.name) as workspace:
                return self.build_disk(Podman(workspace, self.settings.name))
        try:
            choice = choose_disk(self.members_of_layers(podman), self.settings.name)
        except CdiError as error:
            self.disk_error = str(error)
            raise
        slot = self.slots[choice.index]
        with slot.lock:
            self.build(slot, podman)
            try:
                window = slot.layer.window(choice.member, choice.why)
            except OSError as error:
                raise CdiError(f"{self.settings.name}: cannot open {choice.member.name} of "
                               f"layer {slot.index}: {error.strerror}") from None
            self.keep_disk(window)

    def keep_disk(self, window):
        """Make WINDOW, a window onto one file of a layer, the disk export."""
        slot = self.slots[window.index]
        where = {"storage": "in place from podman's storage", "copy": "from its copy",
                 "cache": "from the cache"}[window.parent.how]
        self.disk.description = (f"{window.member.name} of layer {window.index} "
                                 f"({slot.diff_id}), {where}: {window.describe_contents()}")
        window.description = self.disk.description
        self.disk.layer = window
        log.debug(f"export disk: {window.member.name} of layer {window.index}: "
                  f"{window.how_found}")

    def members_of_layers(self, podman):
        """[(index, members)] of every layer, base first.  Layers in storage
        are mapped; the others are read from one podman save, and those
        holding a file that could be the disk are kept."""
        members = {}
        missing = []
        for slot in self.slots:
            with slot.lock:
                if slot.layer is None and slot.plan is not None:
                    self.build_from_storage(slot)
                if slot.layer is not None:
                    members[slot.index] = slot.layer.members
                else:
                    missing.append(slot.index)
        if missing:
            log.debug(f"layers {missing} are not in storage: reading them with podman save")
            for layer in saved_layers(podman, self.image, missing, self.verifying):
                members[layer.index] = layer.members
                slot = self.slots[layer.index]
                with slot.lock:
                    if slot.layer is None and any(
                            member.kind == "file" and is_candidate(member.name)
                            for member in layer.members):
                        self.keep(slot, layer)
                    else:
                        layer.close()
            # A layer that is twice in the image is in podman's archive once.
            by_diff_id = {self.slots[index].diff_id: found for index, found in members.items()}
            for index in missing:
                if self.slots[index].diff_id not in by_diff_id:
                    raise CdiError(f"{self.settings.name}: save: podman's archive has no "
                                   f"layer {self.slots[index].diff_id}")
                members.setdefault(index, by_diff_id[self.slots[index].diff_id])
        return [(slot.index, members[slot.index]) for slot in self.slots]

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

    def keep(self, slot, layer, description=None):
        """Make LAYER SLOT's, described as DESCRIPTION (default: a layer's)."""
        slot.failure = None
        # A copy was checked while copied, a blob of the cache before it is served.
        slot.checked = slot.checked or layer.how != "storage"
        slot.description = description or (
            f"layer {slot.index} of {len(self.slots)}: {slot.diff_id}, "
            f"{describe_size(layer.size)}: {layer.describe_contents()}")
        layer.description = slot.description
        slot.layer = layer
        log.debug(f"export {slot.index}: {layer.how}: {slot.description}")
