"""Getting an artifact or an archive: read from its registry as it is read
(uncompressed blobs, see chunks.py), or whole into an OCI layout: podman's
artifact store (podman >= 5.4), where podman artifact pull puts artifacts,
or the cache's, where skopeo copies what podman cannot pull (artifacts on
podman 4, multi-arch artifacts) or should not import (archives)."""

import dataclasses
import hashlib
import json
import logging
import os
import re

from ..errors import CdiError, NoSource, PolicyRefusal, RegistryError, Unsupported
from .blobs import zstd_available
from .layout import DIGEST, IMAGE_CONFIG_TYPES, ArtifactStore, is_artifact

log = logging.getLogger("cdipy")

GZIP_LAYER_TYPES = ("application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip")
ZSTD_LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
# The most bytes of an image's config read (a manifest's limit too).
MAX_CONFIG = 4 << 20
# What a whole answer to the range probe would be read in: it never is.
PROBE_PIECE = 64 << 10
# os.uname().machine, as OCI platforms name it.
MACHINE_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm",
                         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclasses.dataclass
class Fetched:
    """IMAGE_NAME in LAYOUT (the cache's held locked, or podman's artifact
    store) as the MANIFEST there; FETCH, if the pull policy allows, copies
    it again (for a damaged blob) and returns the manifest; FRESH, the
    digests of the blobs just written (and checked as they were); DIGEST,
    the manifest's, where known."""
    image_name: str
    layout: object
    manifest: dict
    fetch: object = None
    fresh: set = dataclasses.field(default_factory=set)
    digest: str = None

    def fetch_again(self):
        before = set(self.layout.blobs())
        self.manifest = self.fetch()
        self.fresh |= set(self.layout.blobs()) - before


def fetched(layout, name, fetch):
    """NAME copied by FETCH into LAYOUT: a Fetched."""
    result = Fetched(name, layout, {}, fetch)
    result.fetch_again()
    return result


# ------------------------------------------------ podman's artifact store

def stored_artifact(podman, settings, local):
    """The artifact LOCAL in podman's artifact store, as a Fetched whose
    blobs are read in place; None if it is not there, or podman has no
    artifact store."""
    status, output = podman.run(["artifact", "inspect", "--", local],
                                "look up in the artifact store", ok_statuses=(0, 125))
    if status != 0:
        return None  # podman 4 has no "podman artifact"; podman 5: not there
    try:
        found = json.loads(output)
        manifest, stored_name = found["Manifest"], found.get("Name")
    except (ValueError, KeyError, TypeError):
        raise CdiError(f"{settings.name}: look up in the artifact store: podman printed "
                       f"unexpected output: {output[:200]!r}") from None
    store = ArtifactStore(podman.graph_root(), settings.name, settings.cache_directory())
    # The manifest as stored, by its digest (podman's "Digest" is not the
    # manifest's): the one a signature names, and the one served.
    digest = store.manifest_digest(stored_name)
    if digest is not None:
        manifest = store.json_blob(digest)
    log.debug(f"using the artifact {settings.name} from podman's artifact store {store.path}")
    return Fetched(settings.name, store, manifest, digest=digest)


def pull_artifact(podman, settings, local):
    """Pull the artifact LOCAL into podman's artifact store; its Fetched,
    whose new blobs podman checked as it wrote them; None where podman has
    no artifact store (podman 4)."""
    status, _ = podman.run(["artifact", "ls"], "look for the artifact store",
                           ok_statuses=(0, 125))
    if status != 0:
        return None
    store = ArtifactStore(podman.graph_root(), settings.name, settings.cache_directory())
    before = set(store.blobs())
    log.debug(f"{settings.name} is an artifact: pulling it with podman artifact pull")
    podman.run(["artifact", "pull", "--quiet", *settings.registry_options(platform=False),
                "--", local], "pull the artifact")
    pulled = stored_artifact(podman, settings, local)
    if pulled is None:
        raise CdiError(f"{settings.name}: pull the artifact: podman's artifact store does "
                       "not hold it after podman artifact pull")
    pulled.fresh = set(store.blobs()) - before
    return pulled


# ------------------------------------------------------ skopeo, the cache

def inspect_remote(skopeo, settings, source):
    """The manifest (or index) of SOURCE, a docker:// name; None if skopeo
    cannot tell (podman's pull then says why, as for any image)."""
    try:
        _, output = skopeo.run(["inspect", "--raw", *settings.registry_options(platform=False),
                                "--", source], "inspect")
        return json.loads(output)
    except (CdiError, ValueError) as error:
        log.debug(f"cannot read the manifest of {source} with skopeo: {error}")
        return None


def copy(skopeo, settings, layout, source):
    """Copy SOURCE into LAYOUT (locked); return its manifest there.  Blobs
    the layout holds already are not fetched again; the ones skopeo
    writes, it has checked."""
    skopeo.run([*settings.policy_options("skopeo"), *settings.platform_options(),
                "copy", "--quiet",
                "--dest-oci-accept-uncompressed-layers",
                *(settings.registry_options("src-", platform=False)
                  if source.startswith("docker://") else []),
                "--", source, layout.destination(settings.name)], "copy with skopeo")
    found = layout.manifest(settings.name)
    if found is None:
        raise CdiError(f"{settings.name}: copy with skopeo: no manifest in {layout.path}")
    return found[1]


# ------------------------------------------- the registry, as it is read

@dataclasses.dataclass
class Remote:
    """Artifact IMAGE_NAME in the registry (REGISTRY, an oci.registry
    Registry) as MANIFEST, whose bytes DATA have DIGEST: to be read as it
    is read, kept in the cache's LAYOUT."""
    kind = "artifact"   # what it holds, which chooses its source
    image_name: str
    registry: object
    manifest: dict
    data: bytes
    digest: str
    layout: object


@dataclasses.dataclass
class RemoteImage(Remote):
    """An image in its registry, as Remote says, with its CONFIG (parsed,
    its bytes CONFIG_DATA): its gzip layers to be streamed into the
    cache's LAYOUT."""
    kind = "image"
    config: dict
    config_data: bytes


def from_registry(settings, local, layout, admission):
    """LOCAL, read from its registry by cdi.py itself: an artifact of
    uncompressed blobs read as clients read it (a Remote), or with
    pull-into=cache an image of gzip layers streamed in (a RemoteImage);
    None where that cannot be (a compressed artifact, another layer
    compression, verify=before, a setting the client cannot honour), said
    with -v, so that podman or skopeo takes over.  The manifest to be read
    is checked against the signature policy (ADMISSION) before any of its
    blobs is: a refusal is raised, never passed over."""
    if settings.verify == "before":
        return None  # it waits for the whole blob: the whole fetch does that
    # Imported here: requests takes 0.1 s to import, which a start that
    # reads no registry (a warm one) must not pay.
    from .registry import Registry  # noqa: PLC0415
    host, repository, reference = split_reference(local)
    try:
        registry = Registry(host, repository, settings.name, settings, reference)
        data, digest, manifest = read_manifest(registry, reference)
        if settings.pull_into == "cache" and is_image_index(manifest):
            entry = platform_entry(manifest, settings.platform)
            if entry is None:
                log.debug(f"{settings.name}: no one manifest for this platform in its index")
                return None
            data, digest, manifest = read_manifest(registry, entry)
        lazily = lazily_servable(manifest, settings.name)
        stream = not lazily and settings.pull_into == "cache" and \
            streamable(manifest, settings.name)
        if lazily or stream:
            admission.check_remote(registry, digest)
        if lazily:
            probe_ranges(registry, manifest, layout)
            log.debug(f"{settings.name}: manifest {digest}: served from {host} as it is read")
            return Remote(settings.name, registry, manifest, data, digest, layout)
        if stream:
            config_data, config = image_config(registry, manifest, settings.name)
            log.debug(f"{settings.name}: manifest {digest}: streamed from {host} into the "
                      "cache")
            return RemoteImage(settings.name, registry, manifest, data, digest, layout,
                               config, config_data)
    except Unsupported as reason:
        log.debug(f"{settings.name}: {reason}: fetching it whole instead")
    except (PolicyRefusal, NoSource):
        raise  # podman would be refused, or fail, alike
    except RegistryError as error:
        if error.transient and error.status is None and settings.pull_into == "cache":
            # No answer at all, and nothing that podman would do better.
            where = (f"not in the cache {settings.cache_directory()}"
                     if settings.pull == "missing" else "pull=always")
            # The system's words ("Connection refused"), not urllib3's story.
            found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
            reason = found.group(1) if found else str(error).removeprefix(f"{settings.name}: ")
            raise CdiError(f"{settings.name}: {where}, and its registry {host} is "
                           f"unreachable: {reason}") from None
        log.debug(f"cannot read the manifest of {local} from {host}: {error}")
    except (CdiError, ValueError) as error:
        log.debug(f"cannot read the manifest of {local} from {host}: {error}")
    return None


def read_manifest(registry, reference):
    """(bytes, digest, parsed) of manifest REFERENCE."""
    data, _, digest = registry.manifest(reference)
    return data, digest, json.loads(data)


def is_image_index(manifest):
    return isinstance(manifest, dict) and isinstance(manifest.get("manifests"), list) \
        and not is_artifact(manifest)


def platform_entry(index, platform):
    """The digest of INDEX's one manifest for PLATFORM (OS/ARCH[/VARIANT]),
    by default this machine's, as podman would choose it; None if not one."""
    wanted = (platform or f"linux/{MACHINE_ARCHITECTURES.get(os.uname().machine, '')}"
              ).split("/")
    found = [entry.get("digest") for entry in index["manifests"]
             if well_formed([entry]) and isinstance(entry.get("platform"), dict)
             and [entry["platform"].get("os"), entry["platform"].get("architecture"),
                  entry["platform"].get("variant")][:len(wanted)] == wanted]
    return found[0] if len(found) == 1 else None


def streamable(manifest, image_name):
    """Whether MANIFEST is an image whose layers can be streamed: each a
    descriptor with a digest and a size, gzip."""
    if not isinstance(manifest, dict) or is_artifact(manifest) \
            or not well_formed([manifest.get("config")]) \
            or manifest["config"].get("mediaType") not in IMAGE_CONFIG_TYPES \
            or manifest["config"]["size"] > MAX_CONFIG:
        return False
    layers = manifest.get("layers")
    if not well_formed(layers):
        return False
    known = GZIP_LAYER_TYPES + ((ZSTD_LAYER_TYPE,) if zstd_available() else ())
    other = [layer.get("mediaType") for layer in layers if layer.get("mediaType") not in known]
    if other:
        log.debug(f"{image_name} has a layer that is not gzip"
                  f"{' or zstd' if zstd_available() else ' (python3-zstandard is missing)'} "
                  f"({other[0]}): podman pulls it")
        return False
    return True


def image_config(registry, manifest, image_name):
    """(bytes, parsed) of MANIFEST's config, checked against its digest and
    listing a diffID per layer."""
    descriptor = manifest["config"]
    data = registry.blob_range(descriptor["digest"], 0, descriptor["size"]) \
        if descriptor["size"] else b""
    if "sha256:" + hashlib.sha256(data).hexdigest() != descriptor["digest"]:
        raise CdiError(f"{image_name}: the config does not match its digest "
                       f"{descriptor['digest']}")
    config = json.loads(data)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest["layers"]) \
            or not all(isinstance(diff_id, str) and DIGEST.fullmatch(diff_id)
                       for diff_id in diff_ids):
        raise CdiError(f"{image_name}: the image has {len(manifest['layers'])} layers but "
                       "its config does not list as many diffIDs")
    return data, config


def probe_ranges(registry, manifest, layout):
    """Ask for the last byte of the first blob the cache lacks, so that a
    registry that cannot serve it says so now (refused, or Unsupported), not
    at every read; what it cannot tell yet, the reads will try again.  The
    whole blob answered instead (a pull-through cache that does not hold it
    yet, or a registry that ignores Range) is no reason to fetch the image
    whole: the reads keep such an answer as it arrives.  The probe's is
    closed unread, so that it costs what was in flight, not a second
    download; the cache, asked once, fetches the blob meanwhile."""
    for layer in manifest["layers"]:
        if layer["size"] and not os.path.exists(layout.blob_path(layer["digest"])):
            try:
                answer = registry.blob_range_or_whole(layer["digest"], layer["size"] - 1,
                                                      layer["size"], PROBE_PIECE)
            except RegistryError as error:
                if not error.transient:
                    raise
                return
            if not isinstance(answer, (bytes, bytearray)):
                answer.close()
                log.debug(f"{registry.image_name}: its registry answers a range with the "
                          "whole blob: each read keeps such an answer as it arrives")
            return


def lazily_servable(manifest, image_name):
    """Whether MANIFEST is an artifact whose blobs can be read as they are
    read: a manifest (not an index), each layer a descriptor with a digest
    and a size, none compressed."""
    if not isinstance(manifest, dict) or "manifests" in manifest \
            or not isinstance(manifest.get("config") or {}, dict) or not is_artifact(manifest):
        return False
    layers = manifest.get("layers")
    if not well_formed(layers):
        return False  # skopeo, or podman, says what is wrong with it
    compressed = [layer.get("mediaType") for layer in layers
                  if is_compressed(layer.get("mediaType") or "")]
    if compressed:
        log.debug(f"{image_name} has compressed blobs ({compressed[0]}): fetching it whole")
        return False
    return True


def well_formed(descriptors):
    """Whether DESCRIPTORS is a list of descriptors, each with a sha256
    digest and a size."""
    return isinstance(descriptors, list) and all(
        isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str)
        and DIGEST.fullmatch(descriptor["digest"])
        and isinstance(descriptor.get("size"), int) and descriptor["size"] >= 0
        and isinstance(descriptor.get("mediaType", ""), str) for descriptor in descriptors)


def is_compressed(media_type):
    return bool(re.search(r"[+.](gzip|zstd)$", media_type))


def split_reference(local):
    """(registry host, repository, tag or digest) of LOCAL, a name with a
    registry, the repository as the registry's API knows it."""
    host, _, rest = local.partition("/")
    if "@" in rest:
        repository, _, reference = rest.partition("@")
    else:
        repository, _, reference = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    if host == "docker.io" and "/" not in repository:  # Docker Hub's images in library/
        repository = f"library/{repository}"
    return host, repository, reference


def api_host(host):
    """Where the API of registry HOST is: Docker Hub's is elsewhere."""
    return "registry-1.docker.io" if host == "docker.io" else host
