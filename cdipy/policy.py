"""The signature policy (containers-policy.json(5)), read as
containers/image reads it, and what it asks of one image.

The file: signature-policy=, else $HOME/.config/containers/policy.json,
else /etc/containers/policy.json.  For an image, the requirements are
those of the most specific scope of its transport that matches (for the
docker transport: host/repo:tag or host/repo@digest, then host/repo, each
parent namespace, the host, then *.domain wildcards), else the
transport's "" scope, else "default"; every requirement must hold.

cdi.py honours a policy in one of three ways (Trust.how):
  accept  every requirement is insecureAcceptAnything
  verify  sigstoreSigned with a public key (keyPath, keyPaths, keyData,
          keyDatas): checked by cdi.py itself (oci/signatures.py), so that
          reads stay lazy
  hand    signedBy (GPG) or keyless sigstoreSigned (Fulcio, Rekor, PKI):
          the image is fetched whole by podman or skopeo, which verify it
A "reject" anywhere refuses the image before anything is read.
"""

import base64
import dataclasses
import glob
import json
import logging
import os

from .errors import CdiError, PolicyRefusal

__all__ = ["SignaturePolicy", "Trust", "docker_scopes", "registries_d_attachments"]

log = logging.getLogger("cdipy")

SYSTEM_POLICY = "/etc/containers/policy.json"
USER_POLICY = ".config/containers/policy.json"
SYSTEM_REGISTRIES_D = "/etc/containers/registries.d"
USER_REGISTRIES_D = ".config/containers/registries.d"
# The requirement types containers-policy.json(5) defines.
KNOWN_TYPES = ("insecureAcceptAnything", "reject", "signedBy", "sigstoreSigned")
KEY_FIELDS = ("keyPath", "keyPaths", "keyData", "keyDatas")
# sigstoreSigned fields that need Fulcio, Rekor or a PKI: podman's to verify.
KEYLESS_FIELDS = ("fulcio", "pki", "rekorPublicKeyPath", "rekorPublicKeyPaths",
                  "rekorPublicKeyData", "rekorPublicKeyDatas")
IDENTITY_TYPES = ("matchExact", "matchRepoDigestOrExact", "matchRepository",
                  "exactReference", "exactRepository", "remapIdentity")
IDENTITY_FIELDS = {"exactReference": ("dockerReference",),
                   "exactRepository": ("dockerRepository",),
                   "remapIdentity": ("prefix", "signedPrefix")}
# The fields each requirement may have: containers/image refuses a policy
# with any other (a misspelt signedIdentity must not pass as the default).
REQUIREMENT_FIELDS = {
    "insecureAcceptAnything": (), "reject": (),
    "signedBy": ("keyType", "keyPath", "keyPaths", "keyData", "signedIdentity"),
    "sigstoreSigned": (*KEY_FIELDS, *KEYLESS_FIELDS, "signedIdentity"),
}


@dataclasses.dataclass(frozen=True)
class Trust:
    """What the policy at PATH asks of IMAGE_NAME: REQUIREMENTS (the list of
    its scope, SCOPE naming which), and HOW cdi.py honours them."""
    image_name: str
    path: str
    scope: str
    requirements: tuple
    how: str            # "accept", "verify", "hand" or "reject"
    why: str = None     # a reason to reject other than the policy's own

    def refusal(self, reason):
        """The error for an image this policy does not accept, for REASON."""
        return PolicyRefusal(f"{self.image_name}: rejected by the signature policy {self.path} "
                        f"({self.scope}): {reason}")

    def keyed(self):
        """The sigstoreSigned requirements, each (public keys as PEM bytes,
        signedIdentity), that cdi.py verifies itself."""
        return [(public_keys(requirement, self.path), requirement.get("signedIdentity")
                 or {"type": "matchRepoDigestOrExact"})
                for requirement in self.requirements if requirement["type"] == "sigstoreSigned"]

    def words(self):
        """The requirements in a few words, for the debug log."""
        return ", ".join(requirement["type"] for requirement in self.requirements)


class SignaturePolicy:
    """The policy file at PATH, parsed and checked."""

    def __init__(self, path, policy):
        self.path, self.policy = path, policy

    @classmethod
    def load(cls, path=None):
        """The policy of signature-policy=PATH, else the user's, else the
        system's; CdiError naming the file if it is missing or malformed."""
        if path is None:
            user = os.path.join(os.path.expanduser("~"), USER_POLICY)
            path = user if os.path.exists(user) else SYSTEM_POLICY
        try:
            with open(path, "rb") as file:
                policy = json.load(file)
        except FileNotFoundError:
            raise CdiError(f"no signature policy at {path} (containers-policy.json(5)): "
                           "install containers-common or pass signature-policy=PATH") from None
        except (OSError, ValueError) as error:
            raise CdiError(f"signature policy {path}: "
                           f"{getattr(error, 'strerror', None) or error}") from None
        check_policy(policy, path)
        return cls(path, policy)

    def scopes(self, transport):
        """The scopes the policy names for TRANSPORT."""
        return set(self.policy.get("transports", {}).get(transport, {}))

    def trust(self, image_name, transport, identity, namespaces):
        """The Trust of IMAGE_NAME, of TRANSPORT ("docker", "oci-archive"...),
        whose scope IDENTITY is most specific and NAMESPACES follow."""
        scopes = self.policy.get("transports", {}).get(transport, {})
        for scope in (identity, *namespaces, ""):
            if scope in scopes:
                where = f'transport {transport} scope "{scope}"' if scope else \
                    f'transport {transport}, scope ""'
                return make_trust(image_name, self.path, where, scopes[scope])
        return make_trust(image_name, self.path, "default", self.policy["default"])


def make_trust(image_name, path, scope, requirements):
    types = {requirement["type"] for requirement in requirements}
    if "reject" in types:
        how = "reject"
    elif "signedBy" in types or any(
            requirement["type"] == "sigstoreSigned"
            and any(field in requirement for field in KEYLESS_FIELDS)
            for requirement in requirements):
        how = "hand"
    elif "sigstoreSigned" in types:
        how = "verify"
    else:
        how = "accept"
    return Trust(image_name, path, scope, tuple(requirements), how)


def docker_scopes(host, repository, tag=None, digest=None):
    """(identity, namespaces) of a docker reference, as containers/image
    orders them: host/repo@digest, else host/repo:tag; host/repo, its
    parents, the host; then *.domain wildcards of the host without its
    port."""
    name = f"{host}/{repository}"
    identity = f"{name}@{digest}" if digest else f"{name}:{tag or 'latest'}"
    namespaces = []
    while True:
        namespaces.append(name)
        if "/" not in name:
            break
        name = name.rsplit("/", 1)[0]
    domain = name.split(":")[0]
    while "." in domain:
        domain = domain.split(".", 1)[1]
        namespaces.append(f"*.{domain}")
    return identity, namespaces


def path_scopes(path):
    """(identity, namespaces) of a file transport's PATH: the path resolved,
    then each directory above it, as containers/image's oci and dir
    transports name them."""
    resolved = os.path.realpath(path)
    namespaces, parent = [], os.path.dirname(resolved)
    while parent not in ("/", ""):
        namespaces.append(parent)
        parent = os.path.dirname(parent)
    return resolved, namespaces


def registries_d_attachments(identity, namespaces):
    """Whether registries.d says to read sigstore attachments (the tag
    sha256-HEX.sig) for the docker reference of IDENTITY and NAMESPACES:
    the first scope of its docker: entries that sets use-sigstore-attachments,
    else default-docker's; false if none does.  The user's directory, when
    it exists, replaces the system's."""
    directory = os.path.join(os.path.expanduser("~"), USER_REGISTRIES_D)
    if not os.path.isdir(directory):
        directory = SYSTEM_REGISTRIES_D
    import yaml  # noqa: PLC0415 -- only a policy that asks for signatures needs it
    default, docker = None, {}
    for path in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
        try:
            with open(path, "rb") as file:
                config = yaml.safe_load(file) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CdiError(f"registries.d file {path}: "
                           f"{getattr(error, 'strerror', None) or error}") from None
        if not isinstance(config, dict):
            raise CdiError(f"registries.d file {path}: not a mapping")
        if config.get("default-docker") is not None:
            if default is not None:
                raise CdiError(f"registries.d file {path}: default-docker is set in two files")
            default = config["default-docker"]
        for scope, entry in (config.get("docker") or {}).items():
            if scope in docker:
                raise CdiError(f"registries.d file {path}: docker: {scope} is set in two files")
            docker[scope] = entry
    for scope in (identity, *namespaces):
        value = (docker.get(scope) or {}).get("use-sigstore-attachments")
        if value is not None:
            return bool(value)
    return bool((default or {}).get("use-sigstore-attachments"))


def public_keys(requirement, policy_path):
    """The PEM public keys of a sigstoreSigned REQUIREMENT; a relative
    keyPath is read from the working directory, as containers/image reads
    it."""
    keys = []
    paths = requirement.get("keyPaths") or ([requirement["keyPath"]]
                                            if "keyPath" in requirement else [])
    for path in paths:
        try:
            with open(path, "rb") as file:
                keys.append(file.read())
        except OSError as error:
            raise CdiError(f"signature policy {policy_path}: keyPath {path}: "
                           f"{error.strerror}") from None
    for data in requirement.get("keyDatas") or ([requirement["keyData"]]
                                                if "keyData" in requirement else []):
        try:
            keys.append(base64.b64decode(data, validate=True))
        except ValueError:
            raise CdiError(f"signature policy {policy_path}: keyData is not base64") from None
    return keys


def check_policy(policy, path):
    """CdiError naming PATH unless POLICY is a policy containers/image
    would accept: a default, requirements of known types, each list
    non-empty."""
    def fail(what):
        raise CdiError(f"signature policy {path}: {what}")

    if not isinstance(policy, dict) or not isinstance(policy.get("default"), list):
        fail('no "default" list of requirements')
    check_requirements(policy["default"], "default", fail)
    transports = policy.get("transports", {})
    if not isinstance(transports, dict):
        fail('"transports" is not an object')
    for transport, scopes in transports.items():
        if not isinstance(scopes, dict):
            fail(f"transport {transport} is not an object of scopes")
        for scope, requirements in scopes.items():
            check_requirements(requirements, f'transport {transport} scope "{scope}"', fail)


def check_requirements(requirements, where, fail):
    if not isinstance(requirements, list) or not requirements:
        fail(f"{where}: a list of at least one requirement is needed")
    for requirement in requirements:
        kind = requirement.get("type") if isinstance(requirement, dict) else None
        if kind not in KNOWN_TYPES:
            fail(f"{where}: unknown requirement type {kind!r}")
        unknown = sorted(set(requirement) - {"type", *REQUIREMENT_FIELDS[kind]})
        if unknown:
            fail(f"{where}: {kind} has no field {unknown[0]!r}")
        if kind != "sigstoreSigned":
            continue
        given = [field for field in KEY_FIELDS if field in requirement]
        keyless = any(field in requirement for field in KEYLESS_FIELDS)
        if len(given) > 1 or (not given and not keyless):
            fail(f"{where}: sigstoreSigned needs exactly one of " + ", ".join(KEY_FIELDS)
                 + " (or fulcio, or pki)")
        identity = requirement.get("signedIdentity")
        if identity is not None and (not isinstance(identity, dict)
                                     or identity.get("type") not in IDENTITY_TYPES):
            fail(f"{where}: unknown signedIdentity {identity!r}")
        fields = IDENTITY_FIELDS.get((identity or {}).get("type"), ())
        for field in fields:
            if not isinstance(identity.get(field), str) or not identity[field]:
                fail(f"{where}: signedIdentity {identity['type']} needs {field}")
        unknown = sorted(set(identity or {}) - {"type", *fields})
        if unknown:
            fail(f"{where}: signedIdentity {identity['type']} has no field {unknown[0]!r}")
