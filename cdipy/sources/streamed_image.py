"""An image from its registry, its gzip layers streamed into the cache as
they arrive (oci/stream.py), all side by side: the disk export is ready
once the disk's tar header has arrived and the other layers, which decide
whether it is the one, are whole; a layer export once its layer is whole.
podman's storage is not touched.

Each layer whole and checked becomes an unpacked copy in the cache (as a
gzip blob of an archive does), and once all have, the image's config and
manifest join the cache's layout: the next start is the warm path
(sources/layout_blobs.py), with no network.  A layer the cache holds already is
served from there.

A seekable layer (zstd:chunked, eStargz: oci/toc.py) is not streamed: its
table of contents lists it at once, its blob arrives as the disk's reads
ask for it (oci/seekable.py) and, when readers are quiet, the rest behind
them; whole and checked, the blob joins the cache's layout.  Its layer
export is the same blob decompressed in order, read through it: nothing
is fetched twice.

The disk is chosen as disk.py chooses it, from every entry of every layer
but the one holding it, whose entries after the disk are still arriving:
if one of them makes another choice (a second candidate), the disk export
fails from then on, saying so, and the next start, with every entry
known, says what disk.py says."""

import logging
import os
import threading
import time

from ..cache import file_name, link_whole, make_private
from ..disk import choose_disk
from ..errors import CdiError
from ..layer import Window
from ..oci.arrival import RETRY_SECONDS
from ..oci.blobs import BlobMismatch, Blobs, zstd_available
from ..oci.chunks import PartialBlob, RemoteBlob
from ..oci.seekable import SeekableFile, ThroughBlob
from ..oci.stream import Stream, StreamedLayer
from ..oci.toc import ZSTD_CHUNKED, NotSeekable, read_toc, seekable_kind
from ..progress import describe_size
from ..save import open_nameless_file
from ..verify import fingerprint
from . import Entry, Source
from .lazy_artifact import keep_blob, keep_manifest

log = logging.getLogger("cdipy")

# A stream with no more than this left to arrive when the server stops is
# taken in to its end first, for this long at most (all streams together),
# so that a client that read the whole disk leaves the image whole in the
# cache.
FINISH_AT_CLOSE = 4 << 20
FINISH_SECONDS = 10.0


class StreamSource(Source):
    """The layers of REMOTE (an oci.fetch.RemoteImage), their checks
    remembered in RECORDS."""

    def __init__(self, remote, settings, records):
        diff_ids = remote.config["rootfs"]["diff_ids"]
        super().__init__(settings.name, [Entry(index, diff_id) for index, diff_id
                                         in enumerate(diff_ids)],
                         f"{settings.name} at {remote.registry.host}")
        self.remote, self.records = remote, records
        self.lock = threading.Lock()  # the disk's choice, made as layers are listed
        self.blobs = Blobs(remote.layout, records, settings.verify != "false")
        self.layers, self.streams = [], []
        self.seekable = SeekableLayers(remote, self.blobs.unpacked.directory,
                                       self.keep_manifest_if_whole)
        self.early = None  # the disk's Choice, made before its layer was listed whole
        try:
            make_private(self.blobs.unpacked.directory)
            for index, (descriptor, diff_id) in enumerate(zip(remote.manifest["layers"],
                                                              diff_ids)):
                layer = self.cached(index, descriptor, diff_id)
                if layer is None:
                    registry = self.seekable.add(index, descriptor) or self.remote.registry
                    layer = StreamedLayer(self.new_stream(index, descriptor, diff_id, registry))
                    self.streams.append(layer.stream)
                self.layers.append(layer)
            if not self.streams:  # every layer in the cache, and not its manifest?
                self.keep_manifest_if_whole()
        except OSError as error:
            self.close()
            raise CdiError(f"{settings.name}: cannot stream into {self.blobs.unpacked.directory}: "
                           f"{error.strerror}") from None
        except BaseException:
            self.close()
            raise

    def cached(self, index, descriptor, diff_id):
        """Layer INDEX from the cache, checked, if it holds it; else None."""
        try:
            layer = self.blobs.image_layer(index, descriptor, diff_id)
        except BlobMismatch:
            return None
        layer.description = self.describe_layer(layer)
        log.debug(f"layer {index}: from the cache")
        return layer

    def new_stream(self, index, descriptor, diff_id, registry):
        fd = open_nameless_file(self.blobs.unpacked.directory)
        return Stream(index, registry, descriptor, diff_id, fd, whole=self.stream_whole)

    # ------------------------------------------------ what the table asks

    def in_place(self, index):
        layer = self.layers[index]
        return not isinstance(layer, StreamedLayer) or layer.stream.done

    def build(self, index):
        layer = self.layers[index]
        if isinstance(layer, StreamedLayer) and layer.description is None:
            try:
                layer.wait_whole()
            except OSError as error:
                raise CdiError(error.strerror) from None
            layer.description = self.describe_layer(layer)
        return layer

    def pending(self, index):
        if index in self.seekable:
            return (f"layer {index} of {len(self.entries)}: {self.layers[index].digest}, "
                    f"seekable, from {self.remote.registry.host} when first opened")
        stream = self.layers[index].stream
        return (f"layer {index} of {len(self.entries)}: {stream.diff_id}, arriving from "
                f"{self.remote.registry.host}: {describe_size(stream.front)} so far")

    def arriving_disk(self):
        """(Choice, its Window), waiting (or taking in, before nbdkit forks)
        until it is known; None if every layer was in the cache.  OSError
        (EIO) if a layer it needs cannot arrive."""
        if not self.streams:
            return None
        while True:
            found = self.disk_if_known()
            if found is not None:
                return found
            for stream in self.streams:  # side by side, a piece each
                if not stream.listed and stream.index not in self.seekable:
                    seen = stream.received
                    stream.wait_until(lambda stream=stream, seen=seen:
                                      stream.listed or stream.received > seen)

    def disk_if_known(self):
        """The disk as arriving_disk returns it, if it can be told now.
        Under the lock, as check_early_choice: the Window of an early
        choice is there before its layer's whole listing is checked."""
        with self.lock:
            unlisted = [stream.index for stream in self.streams
                        if not stream.listed and stream.index not in self.seekable]
            if len(unlisted) > 1:
                return None
            if not unlisted:
                choice = choose_disk(self.listings(), self.image_name)
            else:
                try:
                    choice = choose_disk(self.listings(), self.image_name)
                except CdiError:
                    return None  # none yet, or two: the rest of the layer tells
                # Early, only for a file under disk/ of the layer still
                # arriving: a file at the root is the disk only if no
                # disk/ ever comes.
                if choice.index != unlisted[0] or not choice.member.name.startswith("disk/"):
                    return None
                self.early = choice
            if choice.index in self.seekable:
                return choice, self.seekable.disk(choice, self.layers[choice.index].digest)
            return choice, Window(self.layers[choice.index], choice.member, choice.why)

    def listings(self):
        """[(index, members)] of every layer, as far as they are listed."""
        return [(index, self.seekable.members(index) if index in self.seekable
                 else list(layer.stream.members) if isinstance(layer, StreamedLayer)
                 else layer.members) for index, layer in enumerate(self.layers)]

    def start_background(self):
        """Stream the layers that are not seekable; fetch the blobs of those
        that are, behind their readers.  (A seekable layer's stream runs
        only if its layer export is read.)"""
        for stream in self.streams:
            if stream.index not in self.seekable:
                stream.start()
        self.seekable.start()

    def close(self):
        arrivals = [stream.arrival for stream in self.streams
                    if stream.index not in self.seekable]
        arrivals += self.seekable.arrivals()
        deadline = time.monotonic() + FINISH_SECONDS
        for arrival in arrivals:
            arrival.take_the_rest(FINISH_AT_CLOSE, deadline)
        for arrival in arrivals:
            arrival.stopping = True
        deadline = time.monotonic() + RETRY_SECONDS + 5
        stopped = [stream.stop(max(deadline - time.monotonic(), 0)) for stream in self.streams]
        for layer in self.layers:
            layer.close()
        self.seekable.close()
        for stream, has_stopped in zip(self.streams, stopped):
            if has_stopped:  # else it may still write: its number must not be reused
                os.close(stream.fd)
            else:
                log.debug(f"layer {stream.index}: a read still runs: its file stays open")
        self.streams, self.layers = [], []

    # ---------------------------------------------------- once one is whole

    def stream_whole(self, stream):
        """STREAM arrived whole and matches its digests: an unpacked copy in
        the cache; with every layer there, the manifest too.  Losing this
        costs a stream next time, never correctness: a failure is a debug
        line."""
        self.check_early_choice(stream)
        blobs, name = self.blobs, file_name(stream.digest)
        path = blobs.unpacked.path(name)
        try:
            with blobs.unpacking():
                link_whole(stream.fd, path, f".partial-{name}")
                blobs.record_unpacked(stream.digest, stream.diff_id)
                copy = blobs.open_layer(stream.index, stream.diff_id, path, "unpacked")
                try:
                    self.records.store(stream.diff_id, fingerprint(copy), [])
                finally:
                    copy.close()
        except (CdiError, OSError) as error:
            log.debug(f"cannot keep layer {stream.index} in the cache: {error}")
        self.keep_manifest_if_whole()

    def keep_manifest_if_whole(self):
        """Once the cache holds every layer unpacked, keep the manifest and
        config in its layout; a failure is a debug line."""
        if not all(self.blobs.holds_unpacked(descriptor["digest"])
                   or os.path.exists(self.remote.layout.blob_path(descriptor["digest"]))
                   for descriptor in self.remote.manifest["layers"]):
            return
        try:
            with self.remote.layout.locked():
                keep_manifest(self.remote, self.remote.layout, self.remote.config_data)
        except (CdiError, OSError) as error:
            log.debug(f"cannot keep the manifest of {self.image_name} in the cache: {error}")

    def check_early_choice(self, stream):
        """If the disk was chosen before STREAM's layer was listed whole,
        make sure the whole listing makes the same choice."""
        with self.lock:
            if self.early is None or self.early.index != stream.index:
                return
            self.fail_early_choice_unless_right(stream)

    def fail_early_choice_unless_right(self, stream):
        early = self.early
        try:
            choice = choose_disk(self.listings(), self.image_name)
            same = (choice.index, choice.member.name, choice.member.offset) == (
                early.index, early.member.name, early.member.offset)
            why = "" if same else (f"{self.image_name}: the VM disk is {choice.member.name} "
                                   f"of layer {choice.index}, not the "
                                   f"{early.member.name} served")
        except CdiError as error:
            why = f"{error} (learnt after {early.member.name} was served)"
        if why:
            log.debug(why)
            for window in self.layers[stream.index].windows:
                window.fail(why)


class SeekableLayers:
    """The seekable layers of the image REMOTE describes (zstd:chunked,
    eStargz): each one's TOC, read and checked at start, and its blob,
    arriving as it is read; the disk's SeekableFile once it is chosen, its
    chunks decompressed into a nameless file of DIRECTORY.  A blob whole
    and checked becomes a blob of the cache's layout; then KEPT() is called."""

    def __init__(self, remote, directory, kept):
        self.remote, self.directory, self.kept = remote, directory, kept
        self.image_name = remote.image_name
        self.layers = {}       # index -> (Toc, RemoteBlob)
        self.disk_file = None  # the SeekableFile served as the disk, once chosen

    def __contains__(self, index):
        return index in self.layers

    def add(self, index, descriptor):
        """If layer INDEX is seekable, and its TOC one this reads: its TOC
        read and checked, its blob arriving as it is read, and what its
        stream reads the blob through (ThroughBlob); else None.  A TOC that
        lies is a CdiError."""
        kind = seekable_kind(descriptor)
        if kind is None:
            return None
        if kind == ZSTD_CHUNKED and not zstd_available():
            return None  # streamed, which says what is missing
        layout, digest = self.remote.layout, descriptor["digest"]
        layout.blob_path(digest)  # refuses a digest that could name another file
        blob = RemoteBlob(index, self.remote.registry,
                          PartialBlob(layout.cache, digest, descriptor["size"], self.image_name),
                          self.blob_whole)
        try:
            toc = read_toc(descriptor, blob.read_range, self.image_name)
        except NotSeekable as error:
            log.debug(f"{error}: layer {index} is streamed instead")
            blob.close()
            return None
        except OSError as error:
            blob.close()
            raise CdiError(f"{self.image_name}: layer {index}: cannot read its table of "
                           f"contents: {error.strerror}") from None
        except BaseException:
            blob.close()
            raise
        log.debug(f"layer {index}: {toc.kind}, {len(toc.files)} files: read as it is asked for")
        self.layers[index] = (toc, blob)
        return ThroughBlob(blob)

    def members(self, index):
        return list(self.layers[index][0].members)

    def disk(self, choice, diff_id):
        """The SeekableFile of CHOICE (a disk.Choice), a file of a seekable
        layer whose diffID is DIFF_ID."""
        if self.disk_file is None:
            toc, blob = self.layers[choice.index]
            fd = open_nameless_file(self.directory)
            try:
                self.disk_file = SeekableFile(choice, toc, toc.files[choice.member.name], blob,
                                              fd, diff_id=diff_id)
            except BaseException:
                os.close(fd)
                raise
        return self.disk_file

    def start(self):
        """Fetch each blob behind its readers (after nbdkit forked)."""
        for _, blob in self.layers.values():
            blob.start()

    def arrivals(self):
        return [blob.arrival for _, blob in self.layers.values()]

    def blob_whole(self, blob, zeros):
        """BLOB arrived whole and matches its digest: a blob of the layout
        (the next start unpacks it once).  A failure is a debug line."""
        try:
            keep_blob(self.remote.layout, blob)
        except (CdiError, OSError) as error:
            log.debug(f"cannot keep {blob.digest} in the cache: {error}")
            return
        self.kept()

    def close(self):
        if self.disk_file is not None:
            self.disk_file.close()
        for _, blob in self.layers.values():
            blob.close()
        self.layers = {}
