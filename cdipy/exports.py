"""The table of exports: what nbdkit reads.  One export per entry of the
source (a layer of the image, or a blob of the artifact), by index,
digest or other name, and "disk", the VM disk file itself; the default;
listing with descriptions; open and close.

Each export has its own lock, held while it is built, so opening a ready
export never waits behind the building of another.  The source builds;
the table knows nothing of podman, skopeo or layouts.
"""

import contextlib
import logging
import re
import threading

from .disk import is_candidate
from .errors import CdiError, NoSuchExport
from .layer import Window
from .verify import check_and_remember, recall_check, start_check

log = logging.getLogger("cdipy")


class Export:
    """One export, NAME, of entry INDEX (whose digest is DIGEST) of the
    source, or with INDEX None the disk.  Pending until built, then ready
    (LAYER), or failed (FAILURE says why, and it is tried again).  Its
    fields change only under LOCK; LAYER is set once and read without it."""

    def __init__(self, name, index=None, digest=None):
        self.name = name
        self.index = index
        self.digest = digest
        self.lock = threading.Lock()
        self.layer = None            # the Layer, once built; then never changed
        self.failure = None          # why the last try to build it failed
        self.check_started = False   # its digest check is started (or done, or not wanted)
        self.check_thread = None     # the thread checking it, if any


class Exports:
    """The exports of SOURCE (see sources/), for SETTINGS, its checks
    remembered in RECORDS: the running plugin's whole state."""

    def __init__(self, source, settings, records):
        self.source = source
        self.settings = settings
        self.records = records
        self.verifying = settings.verify != "false"
        # One Export per entry of the source, by index: "0", "1", ...
        self.exports = [Export(str(entry.index), entry.index, entry.digest)
                        for entry in source.entries]
        self.aliases = {name: self.exports[entry.index]
                        for entry in source.entries for name in entry.names}
        self.disk = DiskExport(self)
        self.default_name = None   # the export named "", once chosen

    # ----------------------------------------------------------- start-up

    def build_default(self):
        """Choose and build the default export (for layer=auto and
        layer=disk, with the layers that decide which file is the VM disk)."""
        count, layer = len(self.exports), self.settings.layer
        if layer in ("auto", "disk"):
            with self.disk.lock:
                self.disk.build()
            self.default_name = str(self.disk.layer.index) if layer == "auto" else "disk"
        elif -count <= layer < count:
            export = self.exports[layer % count]
            self.default_name = export.name
            with export.lock:
                self.build(export)
        else:
            allowed = f"0..{count - 1} or -{count}..-1" if count else "none"
            raise CdiError(f"{self.settings.name}: layer={layer} is out of range: the "
                           f"{self.source.whole} has {count} {self.source.part}"
                           f"{'s' if count != 1 else ''} (allowed: {allowed})")

    def check_default_now(self):
        """verify=before: check the default export's layer before serving,
        unless it was checked already (or passed before, unchanged since)."""
        export = self.find("")
        if export is self.disk:
            export = self.exports[export.layer.index]  # whose check covers the disk
        if export.layer.verified or export.check_started:
            return
        export.check_started = True
        if not recall_check(export.layer, self.records):
            check_and_remember(export.layer, self.settings.name, self.records)

    def build_in_background(self):
        """Build every export the source holds in place, in a thread: a
        client asking for one meanwhile waits for that one alone."""
        def run():
            for export in self.exports:
                with export.lock:
                    try:
                        self.build_in_place(export)
                    except Exception as error:  # one layer's failure stops no other
                        log.debug(f"layer {export.index}: {error}")
        threading.Thread(target=run, name="open-layers", daemon=True).start()
        self.source.start_background()

    # ------------------------------------------------------------ serving

    def find(self, name):
        """The Export NAME: "" (the default), an index (negative from the
        top), "disk", another name of the source's (a blob's title) or a
        digest; None if there is none."""
        count = len(self.exports)
        if name == "":
            name = self.default_name or ""  # none before start-up chose it
        if name == "disk":
            return self.disk
        if name in self.aliases:
            return self.aliases[name]
        if re.fullmatch(r"0|-?[1-9][0-9]{0,19}", name) and -count <= int(name) < count:
            return self.exports[int(name) % count]
        return next((export for export in self.exports if export.digest == name), None)

    def open(self, name):
        """The Layer of export NAME, built if it is not yet; starts its digest
        check.  Raises NoSuchExport if there is no such export, CdiError if
        it cannot be served."""
        export = self.find(name)
        if export is None:
            self.disk.describe()  # then "disk" is named only if there is one
            raise NoSuchExport(f"no export {name!r}: the exports are "
                               + ", ".join(self.names())
                               + " (or -1, -2, ... or a layer's diffID)")
        if export is self.disk:
            return self.disk.open()
        layer = export.layer  # set once: a ready export needs no lock
        if layer is None or not export.check_started:
            with export.lock:
                self.build(export)
                layer = export.layer
                if not export.check_started:
                    export.check_started = True
                    if self.verifying and not (layer.verified or layer.checked_when_whole):
                        export.check_thread = start_check(layer, self.settings.name,
                                                          self.records)
        return layer

    def names(self):
        names = [export.name for export in self.exports] + list(self.aliases)
        return names + ([] if self.disk.error else ["disk"])

    def listing(self):
        """(name, description) of every export; "disk" only once it is found
        (nbdinfo --list opens every export listed): on the copy path, it
        may be opened before."""
        listed = [(name, self.describe(self.find(name))) for name in self.names()]
        return [(name, description) for name, description in listed
                if name != "disk" or self.disk.layer is not None]

    def describe(self, export):
        """What EXPORT holds; one the source holds in place is built to tell,
        one that must be copied or fetched is not."""
        if export is self.disk:
            return self.disk.describe()
        with export.lock:
            self.build_in_place(export)
            if export.layer is not None:
                return export.layer.description
            head = (f"{self.source.part} {export.index} of {len(self.exports)}: "
                    f"{export.digest}")
            if export.failure:
                return f"{head}: cannot be served: {export.failure}"
            return self.source.pending(export.index)

    def close(self):
        """Close every layer, and the source; a check still reading a layer
        stops first."""
        for export in [self.disk, *self.exports]:
            with export.lock:
                if export.layer is not None and export.layer.sources:
                    if export.check_thread is not None:
                        export.layer.fail("the server is stopping")  # ends its check
                        export.check_thread.join()
                    export.layer.close()
        self.source.close()

    # --------------------------------------------- building, under export.lock

    def build(self, export):
        """Build EXPORT's layer, in place if it can be, else as the source
        can (a copy, with TOOLS if given)."""
        if export is self.disk:
            return self.disk.build()
        if self.build_in_place(export) is None and export.layer is None:
            self.keep(export, lambda: self.source.build(export.index))

    def build_in_place(self, export):
        """Build EXPORT's layer if the source holds it in place; its layer, or None."""
        if export.layer is None and self.source.in_place(export.index):
            self.keep(export, lambda: self.source.build_in_place(export.index))
        return export.layer

    def keep(self, export, make):
        """Make EXPORT's layer with MAKE (None: not in place after all); a
        failure is kept, to say why, and raised."""
        try:
            layer = make()
        except CdiError as error:
            export.failure = str(error)
            raise
        if layer is not None:
            export.failure = None
            export.layer = layer
            log.debug(f"export {export.name}: {layer.served_from}: {layer.description}")


class DiskExport(Export):
    """The export "disk" of TABLE: the file the VM would boot, as the source
    chooses it, served as a Window onto its layer; found when first needed."""

    def __init__(self, table):
        super().__init__("disk")
        self.table = table
        self.error = None   # why there is no one disk, once known

    def open(self):
        """The Window; its bytes are its layer's, whose check covers them
        (opening it starts the check, unless the layer checks itself)."""
        if self.layer is None or not self.check_started:
            with self.lock:
                try:
                    self.build()
                except CdiError:
                    if self.error:
                        raise NoSuchExport(self.error) from None
                    raise
            if not self.layer.parent.checked_when_whole:
                self.table.open(str(self.layer.index))
            self.check_started = True
        return self.layer

    def describe(self):
        """What it holds; found now if every entry it depends on is in
        place, otherwise when first opened."""
        table = self.table
        with self.lock:
            if self.layer is None and not self.error and all(
                    export.layer or table.source.in_place(export.index)
                    for export in table.exports):
                with contextlib.suppress(CdiError):  # then error says why
                    self.build()
            if self.layer is not None:
                return self.layer.description
            if self.error:
                return f"no VM disk: {self.error}"
            return table.source.pending_disk

    # ----------------------------------------------------- under self.lock

    def build(self):
        """Choose the disk among the members of every layer, and make its
        Window, in one session of the source."""
        if self.error:
            raise CdiError(self.error)
        if self.layer is not None:
            return
        table, source = self.table, self.table.source
        with source.session():
            try:
                arriving = source.arriving_disk()
                choice, window = arriving if arriving else (
                    source.choose_disk(self.members_of_layers()), None)
            except OSError as error:  # not arrived: another try may tell
                raise CdiError(f"{table.settings.name}: cannot find the VM disk: "
                               f"{error.strerror}") from None
            except CdiError as error:
                self.error = str(error)
                raise
            if window is None:
                export = table.exports[choice.index]
                with export.lock:
                    table.build(export)
                    try:
                        window = Window(export.layer, choice.member, choice.why)
                    except OSError as error:
                        raise CdiError(f"{table.settings.name}: cannot open "
                                       f"{choice.member.name} of {source.part} "
                                       f"{export.index}: {error.strerror}") from None
        window.description = source.describe_disk(window)
        self.layer = window
        log.debug(f"export disk: {choice.member.name} of {source.part} "
                  f"{choice.index}: {choice.why}")

    def members_of_layers(self):
        """[(index, members)] of every entry, base first.  Those in place
        are built; the source reads the others, and those holding a file
        that could be the disk are kept."""
        table = self.table
        members, missing = {}, []
        for export in table.exports:
            with export.lock:
                if table.build_in_place(export) is not None:
                    members[export.index] = export.layer.members
                else:
                    missing.append(export.index)
        if missing:
            for index, layer in table.source.read_members(missing).items():
                members[index] = layer.members
                if layer.index != index:
                    continue  # a layer twice in the image: kept once
                export = table.exports[index]
                with export.lock:
                    if export.layer is None and any(member.kind == "file"
                                                    and is_candidate(member.name)
                                                    for member in layer.members):
                        table.keep(export, lambda layer=layer: layer)
                    else:
                        layer.close()
        return [(export.index, members[export.index]) for export in table.exports]
