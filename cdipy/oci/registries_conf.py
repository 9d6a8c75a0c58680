"""registries.conf, read as containers/image (podman, skopeo) reads it:
which sources an image is pulled from, in which order, and which are
blocked.

The files: CONTAINERS_REGISTRIES_CONF if set (it must exist), else
~/.config/containers/registries.conf if it exists (and then only the
user's drop-in directory), else /etc/containers/registries.conf (which may
be missing); then the *.conf drop-ins of /etc/containers/registries.conf.d
and ~/.config/containers/registries.conf.d, each directory in name order,
each file's [[registry]] replacing an earlier one of the same prefix.
The main file may be in the old v1 format ([registries.search],
[registries.insecure], [registries.block]); drop-ins may not.
credential-helpers, the credential helpers in the order they are asked,
is the last file's that sets it; unset or empty, ["containers-auth.json"]
(the auth files alone).

The entry for an image is the [[registry]] with the longest prefix that
matches its name (host[:port][/namespace...], or *.example.com for any
subdomain), the name parsed and normalized as containers/image does
(docker.io/library/ for Docker Hub's short names).  Its sources: the
mirrors in order (those that pull-from-mirror, or the entry's
mirror-by-digest-only, allow for a tag or a digest), then the primary;
each named by its location plus what follows the prefix.  A source whose
own name is blocked is refused with containers/image's words.  This
module reads files and does nothing else.
"""

import dataclasses
import logging
import os
from typing import Optional

from ..errors import CdiError, NoSource
from ..reference import parse_reference

try:
    import tomllib  # Python 3.11
except ImportError:  # before: Debian's python3-tomli, if it is there
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

__all__ = ["AUTH_FILES", "Entry", "RegistriesConf", "Source", "load", "pull_sources"]

log = logging.getLogger("cdipy")

SYSTEM_FILE = "/etc/containers/registries.conf"
SYSTEM_DIRECTORY = "/etc/containers/registries.conf.d"
USER_FILE = ".config/containers/registries.conf"
USER_DIRECTORY = ".config/containers/registries.conf.d"
PULL_FROM_MIRROR = ("", "all", "digest-only", "tag-only")
# credential-helpers' name for podman's auth files (containers-auth.json(5)).
AUTH_FILES = "containers-auth.json"


@dataclasses.dataclass(frozen=True)
class Mirror:
    """A [[registry.mirror]]: where (LOCATION), whether TLS may go
    unchecked and plain HTTP be tried (INSECURE), and for which references
    (PULL_FROM_MIRROR: "", all, digest-only, tag-only)."""
    location: str
    insecure: bool = False
    pull_from_mirror: str = ""


@dataclasses.dataclass(frozen=True)
class Entry:
    """A [[registry]] of FILE, its PREFIX as containers/image normalizes
    it (the location when none is given)."""
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple = ()
    file: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
    """One place to pull an image from: registry HOST, REPOSITORY, manifest
    REFERENCE (a tag or a digest); INSECURE as the entry says; MIRROR
    whether it is one; BLOCKED, why it must not be used, or None."""
    host: str
    repository: str
    reference: str
    insecure: bool = False
    mirror: bool = False
    blocked: Optional[str] = None

    def name(self):
        """host/repository:tag or host/repository@digest, as podman says it."""
        separator = "@" if is_digest(self.reference) else ":"
        return f"{self.host}/{self.repository}{separator}{self.reference}"


@dataclasses.dataclass
class RegistriesConf:
    """The [[registry]] entries of every file read, sorted by prefix;
    DESCRIPTION, where they come from, in containers/image's words;
    CREDENTIAL_HELPERS, in order (AUTH_FILES for the auth files), set in
    HELPERS_FILE (or by default: "")."""
    entries: list
    description: str
    credential_helpers: tuple = (AUTH_FILES,)
    helpers_file: str = ""

    def find(self, name):
        """The Entry with the longest prefix matching NAME (host/repository,
        with or without a tag or digest), or None."""
        best = None
        for entry in self.entries:
            if matching_prefix(name, entry.prefix) >= 0 and (
                    best is None or len(entry.prefix) > len(best.prefix)):
                best = entry
        return best


def load(home=None, system_file=SYSTEM_FILE, system_directory=SYSTEM_DIRECTORY):
    """The RegistriesConf of the files containers/image would read for the
    user whose home is HOME (default ~); CdiError, naming the file, for one
    it would refuse."""
    home = os.path.expanduser("~") if home is None else home
    main, required, directories = config_files(
        os.environ.get("CONTAINERS_REGISTRIES_CONF"), home, system_file, system_directory)
    entries, helpers, helpers_file = {}, None, ""
    for path in [main, *drop_ins(directories)]:
        try:
            found, helpers_found = read_file(path, drop_in=path != main)
        except FileNotFoundError:
            if path == main and required:
                raise CdiError(f"loading registries configuration {main!r}: "
                               "no such file") from None
            continue  # the system's file may be missing; a drop-in removed since the listing
        entries.update((entry.prefix, entry) for entry in found)
        if helpers_found is not None:  # set, even to [], replaces the earlier files'
            helpers, helpers_file = helpers_found, path
    # containers/image names the user's drop-in directory if it reads one.
    description = f"{main} or {directories[-1]}"
    return RegistriesConf([entries[prefix] for prefix in sorted(entries)], description,
                          tuple(helpers) if helpers else (AUTH_FILES,),
                          helpers_file if helpers else "")


def pull_sources(config, host, repository, reference):
    """The Sources of HOST/REPOSITORY at REFERENCE (a tag or a digest), in
    the order containers/image tries them: the mirrors that apply, then the
    primary.  No entry: the name itself, not insecure.  The entry is found
    for the name parsed and normalized, as containers/image finds it (so
    that no spelling, index.docker.io or a "..", sidesteps a blocked
    prefix); NoSource, in one line, for a name that is no reference."""
    separator = "@" if is_digest(reference) else ":"
    try:
        image = parse_reference(f"{host}/{repository}{separator}{reference}")
    except ValueError:
        raise NoSource("invalid reference format (a registry, a repository of lower-case "
                       "names, and a tag or a digest)") from None
    host, repository = image.host, image.repository
    name = image.name
    full = Source(host, repository, reference).name()
    entry = config.find(name)
    if entry is None:
        return [blocked_as(config, Source(host, repository, reference))]
    digest = is_digest(reference)
    if entry.mirror_by_digest_only:
        mirrors = list(entry.mirrors) if digest else []
    else:
        mirrors = [mirror for mirror in entry.mirrors
                   if not (mirror.pull_from_mirror == "digest-only" and not digest)
                   and not (mirror.pull_from_mirror == "tag-only" and digest)]
    sources = []
    for location, insecure, is_mirror in ([(m.location, m.insecure, True) for m in mirrors]
                                          + [(entry.location, entry.insecure, False)]):
        rewritten = full if not location else \
            location + full[matching_prefix(full, entry.prefix):]
        source = parse_source(rewritten, entry)
        sources.append(blocked_as(config, dataclasses.replace(
            source, insecure=insecure, mirror=is_mirror)))
    return sources


# ------------------------------------------------------------- the files

def config_files(chosen, home, system_file, system_directory):
    """(main file, whether it must exist, [drop-in directories]), CHOSEN
    the file CONTAINERS_REGISTRIES_CONF names, if any."""
    user_file = os.path.join(home, USER_FILE)
    user_directory = os.path.join(home, USER_DIRECTORY)
    if chosen:
        return chosen, True, [system_directory, user_directory]
    if os.path.exists(user_file):
        return user_file, True, [user_directory]  # the system's are not read
    return system_file, False, [system_directory, user_directory]


def drop_ins(directories):
    """The *.conf files of DIRECTORIES, each directory in name order."""
    paths = []
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as error:
            raise CdiError(f"reading registries.conf.d {directory!r}: "
                           f"{error.strerror}") from None
        paths += [os.path.join(directory, name) for name in names
                  if name.endswith(".conf") and not os.path.isdir(os.path.join(directory, name))]
    return paths


def read_file(path, drop_in):
    """(the Entries of the file at PATH, checked as containers/image checks
    them: a prefix given twice, the first wins; its credential-helpers, or
    None if it does not set them)."""
    if tomllib is None:
        raise CdiError(f"loading registries configuration {path!r}: no TOML reader "
                       "(Python < 3.11 without python3-tomli)")
    try:
        with open(path, "rb") as file:
            config = tomllib.load(file)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise CdiError(f"loading registries configuration {path!r}: {error}") from None
    try:
        entries = entries_of(config, drop_in)
        helpers = credential_helpers(config)
    except ValueError as error:
        raise CdiError(f"loading registries configuration {path!r}: {error}") from None
    unique = {}
    for entry in entries:
        unique.setdefault(entry.prefix, dataclasses.replace(entry, file=path))
    return list(unique.values()), helpers


def entries_of(config, drop_in):
    """The Entries of one file's parsed CONFIG; ValueError for what
    containers/image refuses."""
    version1 = config.get("registries")
    if isinstance(version1, dict) and any(version1.get(key) is not None
                                          for key in ("search", "insecure", "block")):
        if drop_in:
            raise ValueError("registry must be in v2 format but is in v1")
        if any(config.get(key) is not None for key in (
                "registry", "unqualified-search-registries", "credential-helpers")):
            raise ValueError("mixing sysregistry v1/v2 is not supported")
        return version1_entries(version1)
    registries = config.get("registry") or []
    if not isinstance(registries, list) or not all(isinstance(r, dict) for r in registries):
        raise ValueError("[[registry]] must be tables")
    entries = [entry_of(registry) for registry in registries]
    check_conflicts(entries)
    return entries


def credential_helpers(config):
    """The credential-helpers list of one file's parsed CONFIG, or None."""
    helpers = config.get("credential-helpers")
    if helpers is not None and (not isinstance(helpers, list)
                                or not all(isinstance(name, str) for name in helpers)):
        raise ValueError("credential-helpers must be a list of strings")
    return helpers


def version1_entries(version1):
    """v1's [registries.block] and [registries.insecure] as entries."""
    found = {}
    for key, field in (("block", "blocked"), ("insecure", "insecure")):
        for listed in ((version1.get(key) or {}).get("registries") or []):
            location = parse_location(listed)
            entry = found.get(location, Entry(location, location))
            found[location] = dataclasses.replace(entry, **{field: True})
    return list(found.values())


def entry_of(registry):
    location = parse_location(registry.get("location") or "")
    prefix = registry.get("prefix") or ""
    if not prefix:
        if not location:
            raise ValueError("invalid condition: both location and prefix are unset")
        prefix = location
    else:
        prefix = parse_location(prefix)
        if not prefix.startswith("*.") and not location:
            raise ValueError("invalid condition: location is unset and prefix is not in "
                             "the format: *.example.com")
    if prefix.startswith("*.") and any(character in prefix for character in "/@:"):
        raise ValueError(f"Wildcarded prefix should be in the format: *.example.com. "
                         f"Current prefix {prefix!r} is incorrectly formatted")
    if registry.get("pull-from-mirror"):
        raise ValueError(f"pull-from-mirror must not be set for a non-mirror registry "
                         f"{prefix!r}")
    by_digest_only = bool(registry.get("mirror-by-digest-only", False))
    mirrors = []
    for mirror in registry.get("mirror") or []:
        mirror_location = parse_location(mirror.get("location") or "")
        if not mirror_location:
            raise ValueError("invalid condition: mirror location is unset")
        how = mirror.get("pull-from-mirror") or ""
        if by_digest_only and how:
            raise ValueError(f"cannot set mirror usage mirror-by-digest-only for the registry "
                             f"({prefix!r}) and pull-from-mirror for per-mirror "
                             f"({mirror_location!r}) at the same time")
        if how not in PULL_FROM_MIRROR:
            raise ValueError(f"unsupported pull-from-mirror value {how!r} for mirror "
                             f"{mirror_location!r}")
        mirrors.append(Mirror(mirror_location, bool(mirror.get("insecure", False)), how))
    return Entry(prefix, location, bool(registry.get("insecure", False)),
                 bool(registry.get("blocked", False)), by_digest_only, tuple(mirrors))


def check_conflicts(entries):
    """Entries of one location must agree on insecure and blocked."""
    seen = {}
    for entry in entries:
        key = entry.location or entry.prefix
        other = seen.setdefault(key, entry)
        for field in ("insecure", "blocked"):
            if getattr(other, field) != getattr(entry, field):
                raise ValueError(f"registry {entry.location!r} is defined multiple times "
                                 f"with conflicting {field!r} setting")


def parse_location(location):
    location = location.rstrip("/")
    if location.startswith(("http://", "https://")):
        raise ValueError(f"invalid location {location!r}: URI schemes are not supported")
    return location


# ------------------------------------------------------------- matching

def matching_prefix(name, prefix):
    """How much of NAME (host/repository, maybe :tag or @digest) PREFIX
    matches, or -1: all of a path component (followed by /, : or @), or
    for *.example.com, any subdomain's host."""
    if prefix.startswith("*."):
        index = name.find(prefix[1:])
        if index < 0 or "/" in name[:index]:
            return -1
        index += len(prefix) - 1
    elif name.startswith(prefix):
        index = len(prefix)
    else:
        return -1
    return index if index == len(name) or name[index] in ":/@" else -1


def parse_source(name, entry):
    """The Source of a rewritten NAME; CdiError if it is no image name."""
    host, _, rest = name.partition("/")
    if not rest:
        raise CdiError(f"registries.conf ({entry.file}): [[registry]] {entry.prefix!r} "
                       f"rewrites the image to {name!r}, which names no repository")
    if "@" in rest:
        repository, _, reference = rest.partition("@")
    elif ":" in rest.rsplit("/", 1)[-1]:
        repository, _, reference = rest.rpartition(":")
    else:
        repository, reference = rest, "latest"
    return Source(host, repository, reference)


def blocked_as(config, source):
    """SOURCE, blocked if the entry of its own name blocks it (as
    containers/image decides, for a mirror too)."""
    entry = config.find(f"{source.host}/{source.repository}")
    if entry is None or not entry.blocked:
        return source
    return dataclasses.replace(
        source, blocked=f"registry {entry.prefix} is blocked in {config.description}")


def is_digest(reference):
    return ":" in reference  # sha256:..., where a tag has no colon
