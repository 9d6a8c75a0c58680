"""OCI image layouts the plugin serves blobs from: the one in the cache
(CACHE/oci) that skopeo copies artifacts and archives into, and podman's
artifact store (podman >= 5.4), which the plugin only reads.

skopeo writes each blob under a temporary name in the layout and renames
it to its digest once it has checked it, so a blob under its digest name
was whole when written; index.json names each copied manifest by a
reference made from the image's name.  Every start that uses the layout
holds its lock, so that two nbdkit processes never write it at once, and
the temporary files of a skopeo killed mid-copy are removed under it.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import time

from ..cache import Cache, write_whole
from ..errors import CdiError
from ..parameters import local_reference

log = logging.getLogger("cdipy")

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Where skopeo (containers/image) writes a blob before renaming it.
PARTIAL_BLOB = "oci-put-blob"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",
                      "application/vnd.docker.container.image.v1+json")


class OciLayout:
    """The blobs of the OCI layout at PATH, for image IMAGE_NAME; CACHE (a
    cache.Cache) is where gzip blobs are unpacked."""
    # How its blobs are named in messages, and where they are served from.
    blob_words = "the cached blob"
    served_from = "cache"

    def __init__(self, path, image_name, cache):
        self.path = path
        self.image_name = image_name
        self.cache = cache

    def json_blob(self, digest):
        try:
            with open(self.blob_path(digest), "rb") as file:
                data = file.read()
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise ValueError("it does not match its digest")
            return json.loads(data)
        except (OSError, ValueError) as error:
            raise CdiError(f"{self.image_name}: {self.blob_words} {digest} cannot be read: "
                           f"{getattr(error, 'strerror', None) or error}") from None

    def blob_path(self, digest):
        """The path of blob DIGEST; a digest that is not a sha256, which
        could name another file, is refused."""
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise CdiError(f"{self.image_name}: the manifest names a blob {digest!r}, "
                           "which is not a sha256 digest")
        return os.path.join(self.path, "blobs", "sha256", digest[len("sha256:"):])

    def blobs(self):
        """The digests of the blobs the layout holds."""
        try:
            return ["sha256:" + name for name in os.listdir(os.path.join(self.path, "blobs",
                                                                         "sha256"))]
        except FileNotFoundError:
            return []

    def advice_on_damage(self):
        """What the user can do about a damaged blob that cannot be fetched again."""
        return f"remove {self.path}"


class ArtifactStore(OciLayout):
    """podman's artifact store, GRAPH_ROOT/artifacts, which podman artifact
    pull and podman artifact add fill: an OCI layout whose blobs are served
    in place.  Read only: a damaged blob is podman's to replace."""
    blob_words = "the blob in podman's artifact store"
    served_from = "artifact store"

    def __init__(self, graph_root, image_name, cache_directory):
        super().__init__(os.path.join(graph_root, "artifacts"), image_name,
                         Cache(cache_directory))

    def advice_on_damage(self):
        return f"remove it with podman artifact rm {self.image_name} and pull it again"

    def manifest_digest(self, name):
        """The digest of the manifest the store's index.json names NAME (as
        podman artifact inspect names it), or None."""
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as file:
                index = json.load(file)
            return next(entry["digest"] for entry in index["manifests"]
                        if (entry.get("annotations") or {}).get(REF_NAME) == name)
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            return None


class Layout(OciLayout):
    """The layout in CACHE_DIRECTORY/oci, for image IMAGE_NAME of PLATFORM
    (None: the default)."""

    def __init__(self, cache_directory, image_name, platform=None):
        if cache_directory is None:
            raise CdiError(f"{image_name}: no cache directory for the artifact: "
                           "HOME is not set; pass cache=DIR")
        cache = Cache(cache_directory)
        super().__init__(cache.path("oci"), image_name, cache)
        self.platform = platform

    @contextlib.contextmanager
    def locked(self):
        """Hold the layout's lock (waiting for another nbdkit's), with the
        cache made private and the leftovers of killed copies removed."""
        with self.cache.locked("oci", self.image_name, (PARTIAL_BLOB, "a copy cut short")):
            yield self

    def destination(self, name):
        """skopeo's name for NAME's place in the layout."""
        return f"oci:{self.path}:{reference(name, self.platform)}"

    def has_index(self):
        return os.path.exists(os.path.join(self.path, "index.json"))

    def manifest(self, name):
        """(digest, manifest) of NAME as last copied, or None (under the
        lock); a manifest blob that is damaged is removed, and NAME is then
        not in the layout: fetched again, it is written again."""
        wanted = reference(name, self.platform)
        for entry in self.index().get("manifests", []):
            if (entry.get("annotations") or {}).get(REF_NAME) == wanted:
                digest = entry.get("digest")
                try:
                    return digest, self.json_blob(digest)
                except CdiError as error:
                    log.debug(f"{error}: fetched again")
                    if isinstance(digest, str) and DIGEST.fullmatch(digest):
                        self.remove_blob(digest)
                    return None
        return None

    def index(self):
        """index.json; one that is damaged (a crash or a full disk while it
        was written) is set aside, and the layout starts anew (under the lock)."""
        path = os.path.join(self.path, "index.json")
        try:
            with open(path, "rb") as file:
                index = json.load(file)
            if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
                raise ValueError("not an OCI index")
            return index
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as error:
            aside = f"{path}.damaged-{int(time.time())}"
            log.debug(f"the cache's {path} is damaged ({error}): set aside as {aside}; "
                      "what it named is fetched again")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            return {}

    def keep_blob(self, digest, path):
        """Name the file at PATH blob DIGEST (under the lock): a hard link,
        so that whoever serves the file goes on serving it.  Whether it was
        linked (False: the layout holds the blob already, or PATH is gone)."""
        os.makedirs(os.path.dirname(self.blob_path(digest)), mode=0o700, exist_ok=True)
        try:
            os.link(path, self.blob_path(digest))
        except (FileExistsError, FileNotFoundError):
            return False
        return True

    def write_blob(self, data):
        """Keep DATA, a small blob, as a blob (under the lock), unless the
        layout holds it intact already; its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.holds_intact(digest):
            os.makedirs(os.path.dirname(self.blob_path(digest)), mode=0o700, exist_ok=True)
            write_whole(self.blob_path(digest), data)
        return digest

    def holds_intact(self, digest):
        """Whether the layout holds small blob DIGEST, matching it."""
        try:
            with open(self.blob_path(digest), "rb") as file:
                return "sha256:" + hashlib.sha256(file.read()).hexdigest() == digest
        except OSError:
            return False

    def name_manifest(self, name, descriptor):
        """Make index.json name DESCRIPTOR (a manifest's, in the layout) as
        NAME (under the lock), as skopeo would."""
        wanted = reference(name, self.platform)
        index = self.index() or {"schemaVersion": 2, "manifests": []}
        index["manifests"] = [entry for entry in index.get("manifests", [])
                              if (entry.get("annotations") or {}).get(REF_NAME) != wanted]
        index["manifests"].append({**descriptor, "annotations": {REF_NAME: wanted}})
        write_whole(os.path.join(self.path, "oci-layout"), b'{"imageLayoutVersion": "1.0.0"}')
        write_whole(os.path.join(self.path, "index.json"), json.dumps(index).encode())

    def remove_blob(self, digest):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(digest))


def reference(name, platform=None):
    """The ref.name in index.json for image NAME of PLATFORM: a digest of
    the name (the same with or without docker://), which may hold
    characters an OCI reference may not."""
    canonical = local_reference(name) or name
    if platform is not None:
        canonical += f" {platform}"
    return "cdi-py-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def is_artifact(manifest):
    """Whether MANIFEST, a registry's manifest or index, is an artifact
    (something other than a container image) that podman cannot pull."""
    media_type = manifest.get("mediaType")
    if media_type in INDEX_TYPES or "manifests" in manifest:
        return any(entry.get("artifactType") for entry in manifest.get("manifests", []))
    config = manifest.get("config") or {}
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if config_type is None:  # a schema 1 image has no config
        return bool(manifest.get("artifactType"))
    return config_type not in IMAGE_CONFIG_TYPES
