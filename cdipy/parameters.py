"""The plugin's key=value parameters: each checked as it arrives, then all
together once nbdkit has passed them all."""

import dataclasses
import os
import re
from typing import Optional, Union

from .errors import CdiError

# What each parameter means, for --dump-plugin and for error messages; the
# manual says it at length, one =item each (tests/unit/test_docs.py checks).
PARAMETERS = {
    "name": "IMAGE (required) the image or OCI artifact, anything podman pull "
            "accepts; archives (oci-archive:, docker-archive:) leave podman's storage "
            "untouched",
    "layer": "N|auto|disk default export: 0 = base layer or first blob (default), "
             "negative counts from the top, auto = the layer or blob holding the VM "
             "disk, disk = the VM disk file itself (the export named disk)",
    "pull": "missing|always|never when to contact the registry (default missing)",
    "tls-verify": "true|false passed to podman pull and skopeo",
    "authfile": "PATH registry credentials, passed to podman pull and skopeo",
    "cert-dir": "PATH TLS certificates, passed to podman pull and skopeo",
    "platform": "OS/ARCH[/VARIANT] image to take from a multi-arch manifest list",
    "verify": "true|before|false check each layer hashes to its diffID "
              "(default true: while copying, or in the background)",
    "copy": "true|false copy the layer to TMPDIR instead of serving it from "
            "podman's storage (default false)",
    "cache": "DIR where artifacts and archives are copied, and layers that passed "
             "their check are remembered (default $XDG_CACHE_HOME/cdi-py, else "
             "~/.cache/cdi-py)",
    "pull-into": "cache|podman where an image pulled from a registry goes (default cache: "
                 "its gzip layers streamed into the cache and served as they arrive, "
                 "podman's storage untouched; podman: podman pull, then served from "
                 "podman's storage)",
    "signature-policy": "PATH the signature policy (containers-policy.json), as podman's "
                        "--signature-policy (default ~/.config/containers/policy.json, "
                        "else /etc/containers/policy.json)",
}
PULL_INTO = ("cache", "podman")
PULL_POLICIES = ("missing", "always", "never")
# Image transports podman understands; other "word:" prefixes are registry ports.
TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "dir",
              "containers-storage", "docker-daemon")
EXAMPLE_IMAGE = "quay.io/kubevirt/fedora-cloud-container-disk-demo"
# Where a user who got a parameter wrong is sent: docs/nbdkit-cdipy-plugin.pod.
MANUAL = "nbdkit-cdipy-plugin(1)"


@dataclasses.dataclass
class Settings:
    """Every parameter, parsed.  None: not given (podman's own default)."""
    name: Optional[str] = None
    layer: Union[int, str] = 0         # an index, negative from the top, "auto" or "disk"
    pull: str = "missing"
    tls_verify: Optional[bool] = None
    authfile: Optional[str] = None
    cert_dir: Optional[str] = None
    platform: Optional[str] = None
    verify: str = "true"               # "true", "before" or "false"
    copy: bool = False
    cache: Optional[str] = None        # None: the default, from the environment
    pull_into: str = "cache"
    signature_policy: Optional[str] = None

    def set(self, key, value):
        """Parse and keep KEY=VALUE; every error names the key."""
        parser = PARSERS.get(key)
        if parser is None:
            raise CdiError(f"unknown parameter {key!r}: this plugin takes "
                           + ", ".join(f"{known}=" for known in PARAMETERS)
                           + f"; see {MANUAL}")
        setattr(self, key.replace("-", "_"), parser(key, value))

    def check_complete(self):
        """Checks that need every parameter, once nbdkit has passed them."""
        if self.name is None:
            raise CdiError("you must supply name=IMAGE after the script name, "
                           f"for example: nbdkit python cdi.py name={EXAMPLE_IMAGE}; "
                           f"see {MANUAL}")
        if self.authfile is not None and not os.path.isfile(self.authfile):
            raise CdiError(f"authfile={self.authfile!r}: no such file")
        if self.signature_policy is not None and not os.path.isfile(self.signature_policy):
            raise CdiError(f"signature-policy={self.signature_policy!r}: no such file")
        if self.cert_dir is not None and not os.path.isdir(self.cert_dir):
            raise CdiError(f"cert-dir={self.cert_dir!r}: no such directory")
        if self.pull == "never" and local_reference(self.name) is None:
            raise CdiError(f"pull=never cannot be used with {self.name}: "
                           "that transport is always read anew")

    def cache_directory(self):
        """The cache=, else the XDG default; None if there is no home."""
        if self.cache is not None:
            return self.cache
        base = os.environ.get("XDG_CACHE_HOME") or (
            os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else None)
        return os.path.join(os.path.abspath(base), "cdi-py") if base else None

    def registry_options(self, prefix="", platform=True):
        """podman pull's options for these settings, each one argv element;
        with PREFIX "src-", skopeo copy's (whose platform options are
        skopeo's own, see platform_options)."""
        options = []
        if self.tls_verify is not None:
            options.append(f"--{prefix}tls-verify={str(self.tls_verify).lower()}")
        for option, value in (("authfile", self.authfile), ("cert-dir", self.cert_dir),
                              ("platform", self.platform if platform else None)):
            if value is not None:
                options.append(f"--{prefix}{option}={value}")
        return options

    def platform_options(self):
        """skopeo's options choosing platform= from a multi-arch index."""
        if self.platform is None:
            return []
        names = ("--override-os", "--override-arch", "--override-variant")
        return [f"{name}={part}" for name, part in zip(names, self.platform.split("/"))]

    def policy_options(self, program):
        """The option giving signature-policy= to PROGRAM: podman pull's,
        or skopeo's (global, before the command)."""
        if self.signature_policy is None:
            return []
        option = "--signature-policy" if program == "podman" else "--policy"
        return [f"{option}={self.signature_policy}"]


def split_transport(name):
    """Return (transport, rest); transport is "" for a plain registry name."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in TRANSPORTS:
        return prefix, rest
    return "", name


def local_reference(name):
    """The name to look up in local storage, or None for file transports,
    which podman must always import."""
    transport, rest = split_transport(name)
    if transport == "":
        return name
    if transport == "docker":
        return rest.lstrip("/")
    if transport == "containers-storage":
        return rest
    return None


def registry_of(name):
    """The registry host a name refers to, as podman would contact it."""
    return registry_host(name) or "the default search registries"


def registry_host(name):
    """The registry host NAME names, or None for a short name (which only
    podman resolves, through its search registries) or a file."""
    if split_transport(name)[0] not in ("", "docker", "containers-storage"):
        return None
    first, sep, _ = local_reference(name).partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def parse_image_name(key, value):
    if value == "":
        raise CdiError(f"name= is empty: expected an image such as {EXAMPLE_IMAGE}")
    if value.startswith("-"):
        raise CdiError(f"name={value!r}: an image name cannot start with '-'")
    if not value.isprintable() or any(character.isspace() for character in value):
        raise CdiError(f"name={value!r}: an image name cannot contain "
                       "spaces or control characters")
    return value


def parse_layer(key, value):
    if value in ("auto", "disk"):
        return value
    if not re.fullmatch(r"-?[0-9]+", value):
        raise CdiError(f"layer={value!r}: expected an integer "
                       "(0 = base layer, -1 = top layer), auto or disk")
    if len(value) > 20:
        raise CdiError(f"layer={value[:20]}...: too many digits for a layer number")
    if value.startswith("-") and int(value) == 0:
        raise CdiError(f"layer={value!r} is ambiguous: "
                       "use 0 for the base layer or -1 for the top layer")
    return int(value)


def parse_bool(key, value):
    words = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
    try:
        return words[value.lower()]
    except KeyError:
        raise CdiError(f"{key}={value!r}: expected true or false") from None


def one_of(choices):
    """A parser of a value that must be one of CHOICES."""
    def parse(key, value):
        if value not in choices:
            raise CdiError(f"{key}={value!r}: expected one of " + ", ".join(choices))
        return value
    return parse


def parse_path(key, value):
    if value == "":
        raise CdiError(f"{key}= is empty: expected a path")
    return os.path.abspath(value)


def parse_platform(key, value):
    if not re.fullmatch(r"[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_.]+)?", value):
        raise CdiError(f"platform={value!r}: expected OS/ARCH[/VARIANT], "
                       "for example linux/arm64/v8")
    return value


def parse_verify(key, value):
    if value == "before":
        return value
    try:
        return str(parse_bool(key, value)).lower()
    except CdiError:
        raise CdiError(f"verify={value!r}: expected true, before or false") from None


PARSERS = {
    "name": parse_image_name,
    "layer": parse_layer,
    "pull": one_of(PULL_POLICIES),
    "tls-verify": parse_bool,
    "authfile": parse_path,
    "cert-dir": parse_path,
    "platform": parse_platform,
    "verify": parse_verify,
    "copy": parse_bool,
    "cache": parse_path,
    "pull-into": one_of(PULL_INTO),
    "signature-policy": parse_path,
}
