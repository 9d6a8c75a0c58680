"""Image names as docker references (distribution/reference's grammar),
normalized as containers/image normalizes them: the one parse that the
signature policy's scopes, the identities signatures name, and the
registry's repository agree on."""

import dataclasses
import re
from typing import Optional

__all__ = ["DIGEST", "Reference", "parse_reference"]

DOCKER_HUB = "docker.io"
# What containers/image takes for Docker Hub too.
DOCKER_HUB_ALIASES = ("index.docker.io",)
# The grammar of distribution/reference, without IPv6 hosts.
HOST = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*"
                  r"[a-zA-Z0-9])?)*(?::[0-9]+)?")
PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Reference:
    """A docker reference, normalized as containers/image does: NAME is
    host/repository (docker.io/library/ for Docker Hub's short names)."""
    name: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    def __str__(self):
        return self.name + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")

    def name_only(self):
        return self.tag is None and self.digest is None

    @property
    def host(self):
        return self.name.split("/", 1)[0]

    @property
    def repository(self):
        return self.name.split("/", 1)[1]


def parse_reference(text):
    """The Reference TEXT names; ValueError if it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a docker reference")
    name, at, digest = text.partition("@")
    tag = None
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
    components = name.split("/")
    if len(components) > 1 and ("." in components[0] or ":" in components[0]
                                or components[0] == "localhost"):
        host = components.pop(0)
    else:
        host = DOCKER_HUB
    if not HOST.fullmatch(host) or not all(PATH_COMPONENT.fullmatch(part)
                                           for part in components) \
            or (tag is not None and not TAG.fullmatch(tag)) \
            or (at and not DIGEST.fullmatch(digest)):
        raise ValueError(f"{text!r} is not a docker reference")
    if host in DOCKER_HUB_ALIASES:
        host = DOCKER_HUB
    if host == DOCKER_HUB and len(components) == 1:
        components.insert(0, "library")
    return Reference(f"{host}/{'/'.join(components)}", tag, digest or None)
