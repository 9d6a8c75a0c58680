"""The registry of the unit tests: blobs in memory, answering what cdipy's
sources ask a registry (cdipy.oci.registry.Registry) for their bytes.  The
end-to-end tests use the real registry."""

from cdipy.errors import RegistryError


class Registry:
    """Registry IMAGE_NAME holding BLOBS, {digest: bytes}, or one blob
    (bytes) answered whatever digest is asked.  The first FAILURES requests
    fail as a cut connection; with AWAY set, every request is refused; the
    first answer of blob_pieces breaks off after CUT bytes, if given.  It
    records the ranges (blob_range) and the starts (blob_pieces) asked."""
    host = "registry.example"

    def __init__(self, blobs, image_name="registry.example/disk:1", *, failures=0, cut=None,
                 away=False):
        self.blobs, self.image_name = blobs, image_name
        self.failures, self.cut, self.away = failures, cut, away
        self.ranges, self.starts = [], []

    def blob_range(self, digest, start, end):
        self.answer()
        self.ranges.append((start, end))
        return self.blob(digest)[start:end]

    def blob_pieces(self, digest, start, piece):
        self.answer()
        self.starts.append(start)
        data = self.blob(digest)
        end = len(data)
        if self.cut is not None:
            end, self.cut = start + self.cut, None
        for offset in range(start, end, piece):
            yield data[offset:min(offset + piece, end)]
        if end < len(data):
            raise RegistryError("the connection was cut", transient=True)

    def answer(self):
        """Fail, if this request is to."""
        if self.away:
            raise RegistryError("the connection was refused", transient=True)
        if self.failures:
            self.failures -= 1
            raise RegistryError("the connection was cut", transient=True)

    def blob(self, digest):
        return self.blobs if isinstance(self.blobs, bytes) else self.blobs[digest]
