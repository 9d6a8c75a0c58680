"""The registry itself, over HTTP: manifests, and ranges of blobs, with the
credentials and TLS settings podman would use.

What podman would use: the credentials of authfile=, else of podman's own
auth files (REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
~/.config/containers/auth.json, ~/.docker/config.json); the certificates
of cert-dir=, else of /etc/containers/certs.d/HOST (CAs *.crt, a client
certificate *.cert with its *.key); tls-verify=, else registries.conf's
"insecure" for the registry (then plain HTTP is tried too).  Every
registry's token flow (Bearer, anonymous too) and basic auth are spoken
here; a redirect to blob storage never carries our Authorization (requests
drops it for another host).  What this cannot honour (a credential helper,
a mirror, a blocked registry) raises Unsupported, so that the caller takes
the whole fetch instead.
"""

import base64
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.request
import warnings

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InsecureRequestWarning

from ..errors import CdiError, RegistryError, Unsupported
from .layout import INDEX_TYPES, MANIFEST_TYPES

try:
    import tomllib  # Python 3.11
except ImportError:  # before: Debian's python3-tomli, if it is there
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

log = logging.getLogger("cdipy")

ACCEPTED = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
# Seconds to wait to connect, and for each read of a response.
TIMEOUTS = (10, 30)
# Tokens are renewed this long before the registry says they expire.
TOKEN_MARGIN = 10
MAX_MANIFEST = 4 << 20
# Seconds a credential helper may take to answer.
HELPER_SECONDS = 30


class Registry:
    """Repository REPOSITORY of registry HOST (host[:port], as the image's
    name says it: registries.conf and auth files name it so), for image
    IMAGE_NAME, as SETTINGS (parameters.Settings) say to reach it.  Its API
    is at API_HOST (Docker Hub's is elsewhere), HOST if not given."""

    def __init__(self, host, repository, image_name, settings, api_host=None):
        self.host, self.repository, self.image_name = host, repository, image_name
        self.api_host = api_host or host
        config = registry_config(host, repository)
        if config.get("blocked"):
            raise Unsupported(f"registries.conf blocks {host}")
        if config.get("mirrors") or config.get("location", host) != host:
            raise Unsupported(f"registries.conf gives {host} a mirror or another location")
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(host.split(":")[0]):
            raise Unsupported("the environment names an HTTP proxy")
        self.insecure = (not settings.tls_verify if settings.tls_verify is not None
                         else bool(config.get("insecure")))
        self.credentials = credentials(host, repository, settings.authfile)
        self.certificates = certificates(host, settings.cert_dir)
        self.scheme = "https"
        self.scheme_known = False    # once a request succeeded, never changed
        self.lock = threading.Lock()
        self.authorization = None    # the header value that last worked
        self.token_expires = None    # monotonic time, for a Bearer token
        self.local = threading.local()

    # ------------------------------------------------------------ requests

    def manifest(self, reference):
        """(bytes, media type, digest) of manifest REFERENCE (a tag or digest),
        checked against the digest when REFERENCE is one."""
        response = self.get(f"manifests/{reference}", headers={"Accept": ACCEPTED},
                            what=f"manifest {reference}")
        data = response.content
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"{self.image_name}: the manifest is {len(data)} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{self.image_name}: the manifest is {digest}, not {reference}")
        return data, response.headers.get("Content-Type", "").split(";")[0], digest

    def blob_range(self, digest, start, end):
        """Bytes START to END (excluded) of blob DIGEST; RegistryError if the
        registry answers another range, or fewer bytes."""
        # The bytes as stored: a compressed answer would be other bytes.
        response = self.get(f"blobs/{digest}", headers={"Range": f"bytes={start}-{end - 1}",
                                                        "Accept-Encoding": "identity"},
                            what=f"blob {digest} bytes {start}-{end - 1}", stream=True)
        with contextlib.closing(response):
            if response.status_code != 206:
                raise Unsupported(f"{self.api_host} answered a range of blob {digest} with "
                                  f"HTTP {response.status_code}, not 206")
            got = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/.*",
                               response.headers.get("Content-Range", ""))
            if not got or (int(got.group(1)), int(got.group(2)) + 1) != (start, end):
                raise RegistryError(f"{self.image_name}: the registry sent "
                                    f"{response.headers.get('Content-Range')!r} for bytes "
                                    f"{start}-{end - 1} of {digest}")
            try:
                data = response.raw.read(end - start + 1, decode_content=False)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                raise RegistryError(f"{self.image_name}: reading blob {digest}: {error}",
                                    transient=True) from None
        if len(data) != end - start:
            raise RegistryError(f"{self.image_name}: the registry sent {len(data)} bytes of "
                                f"{end - start} of blob {digest}", transient=True)
        return data

    def blob_pieces(self, digest, start, piece):
        """Yield blob DIGEST from byte START to its end, PIECE bytes at a
        time (the last may be short), as stored; RegistryError (transient)
        if the answer breaks off."""
        headers = {"Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        response = self.get(f"blobs/{digest}", headers=headers,
                            what=f"blob {digest} from byte {start}", stream=True)
        with contextlib.closing(response):
            if start and (response.status_code != 206 or not response.headers.get(
                    "Content-Range", "").startswith(f"bytes {start}-")):
                raise RegistryError(f"{self.image_name}: {self.api_host} answered bytes "
                                    f"{start}- of blob {digest} with HTTP "
                                    f"{response.status_code} "
                                    f"{response.headers.get('Content-Range')!r}")
            while True:
                try:
                    data = response.raw.read(piece, decode_content=False)
                except (requests.RequestException, urllib3.exceptions.HTTPError,
                        OSError) as error:
                    raise RegistryError(f"{self.image_name}: reading blob {digest}: {error}",
                                        transient=True) from None
                if not data:
                    return
                yield data

    def get(self, path, headers, what, stream=False):
        """GET /v2/REPOSITORY/PATH, authorized (asking for a token, or
        renewing it, once, on 401)."""
        for attempt in range(2):
            url = f"{self.scheme}://{self.api_host}/v2/{self.repository}/{path}"
            sent = dict(headers)
            if self.authorization and not self.token_expired():
                sent["Authorization"] = self.authorization
            response = self.request(url, sent, what, stream)
            if response.status_code != 401 or attempt == 1:
                break
            response.close()
            self.authorize(response.headers.get("WWW-Authenticate", ""), what)
        if response.status_code in (200, 206):
            return response
        response.close()
        reason = {401: "authentication required", 403: "access denied",
                  404: "not found", 416: "range not satisfiable"}.get(response.status_code, "")
        raise RegistryError(f"{self.image_name}: {what}: {self.host} answered HTTP "
                            f"{response.status_code}{' ' + reason if reason else ''}",
                            transient=response.status_code >= 500 or response.status_code == 429,
                            status=response.status_code)

    def request(self, url, headers, what, stream=False):
        # An insecure registry may speak plain HTTP: found at its first
        # request, as podman does, and never changed after one succeeded.
        may_try_http = self.insecure and not self.scheme_known and url.startswith("https:")
        try:
            response = self.session().get(url, headers=headers, timeout=TIMEOUTS,
                                          stream=stream)
        except requests.exceptions.SSLError as error:
            if not may_try_http:
                raise RegistryError(f"{self.image_name}: {what}: TLS with {self.api_host}: "
                                    f"{error}") from None
        except requests.RequestException as error:
            if not may_try_http:
                raise RegistryError(f"{self.image_name}: {what}: {self.api_host}: {error}",
                                    transient=True) from None
        else:
            self.scheme_known = True
            return response
        log.debug(f"{self.api_host} does not answer HTTPS: trying HTTP")
        self.scheme = "http"
        return self.request("http" + url[len("https"):], headers, what, stream)

    def session(self):
        """This thread's session: connections are reused, never shared."""
        session = getattr(self.local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxy or .netrc of the environment's
            if self.insecure:
                session.verify = False
                warnings.filterwarnings("ignore", category=InsecureRequestWarning)
            elif self.certificates[0] or self.certificates[1]:
                session.mount("https://", ContextAdapter(self.tls_context()))
            self.local.session = session
        return session

    def tls_context(self):
        authorities, client = self.certificates
        context = ssl.create_default_context()
        # urllib3 matches the name itself (IP addresses too, which the
        # context cannot without a server_hostname); the chain is still checked.
        context.check_hostname = False
        for path in authorities:
            context.load_verify_locations(cafile=path)
        if client:
            context.load_cert_chain(*client)
        return context

    # ------------------------------------------------------ authorization

    def token_expired(self):
        return self.token_expires is not None and time.monotonic() >= self.token_expires

    def authorize(self, challenge, what):
        """Answer the registry's CHALLENGE (WWW-Authenticate): basic auth
        with the credentials, or a Bearer token from its realm."""
        scheme, _, rest = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        with self.lock:
            if scheme.lower() == "basic":
                if self.credentials is None:
                    raise RegistryError(f"{self.image_name}: {what}: authentication required "
                                        f"by {self.host}: run podman login or pass authfile=")
                self.authorization = "Basic " + base64.b64encode(
                    ":".join(self.credentials).encode()).decode()
                self.token_expires = None
            elif scheme.lower() == "bearer" and fields.get("realm"):
                self.authorization, self.token_expires = self.token(fields, what)
            else:
                raise RegistryError(f"{self.image_name}: {what}: {self.host} asks for "
                                    f"authentication this plugin cannot give ({challenge!r})")

    def token(self, fields, what):
        """A Bearer token from the realm of FIELDS for pulling the repository,
        anonymous without credentials; (header value, expiry)."""
        params = {"scope": fields.get("scope") or f"repository:{self.repository}:pull"}
        if fields.get("service"):
            params["service"] = fields["service"]
        try:
            response = self.session().get(
                fields["realm"], params=params, timeout=TIMEOUTS,
                auth=tuple(self.credentials) if self.credentials else None)
        except requests.RequestException as error:
            raise RegistryError(f"{self.image_name}: {what}: token from {fields['realm']}: "
                                f"{error}", transient=True) from None
        with contextlib.closing(response):
            if response.status_code != 200:
                raise RegistryError(f"{self.image_name}: {what}: the token service "
                                    f"{fields['realm']} answered HTTP {response.status_code}"
                                    + (": run podman login or pass authfile="
                                       if response.status_code == 401 else ""))
            try:
                answer = response.json()
                token = answer.get("token") or answer["access_token"]
                lifetime = int(answer.get("expires_in") or 60)
            except (ValueError, KeyError, TypeError):
                raise RegistryError(f"{self.image_name}: {what}: the token service "
                                    f"{fields['realm']} answered no token") from None
        log.debug(f"a token from {fields['realm']} for {params['scope']}, for {lifetime} s")
        return f"Bearer {token}", time.monotonic() + max(lifetime - TOKEN_MARGIN, 1)


# Docker Hub's credentials, as docker and older podman name them.
DOCKER_HUB_KEYS = ["index.docker.io", "registry-1.docker.io"]


class ContextAdapter(HTTPAdapter):
    """HTTPS with an ssl.SSLContext of our own: certs.d's CAs, a client
    certificate."""

    def __init__(self, context):
        self.context = context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self.context
        return super().init_poolmanager(*args, **kwargs)


# ------------------------------------------------ podman's configuration

def credentials(host, repository, authfile=None):
    """(user, password) for HOST/REPOSITORY from the first auth file podman
    would read that gives some, or None (anonymous).  In each file: its
    credHelpers entry for HOST (that helper alone), else its auths entry
    (the most specific key), else its credsStore helper.  Unsupported for
    an identity token, which only podman can use."""
    for path in auth_files(authfile):
        try:
            with open(path, "rb") as file:
                config = json.load(file)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            raise Unsupported(f"cannot read {path}: {error}") from None
        if not isinstance(config, dict):
            raise Unsupported(f"cannot read {path}: not a JSON object")
        helper = (config.get("credHelpers") or {}).get(host)
        if helper:
            found = helper_credentials(helper, host, path)
            if found:
                return found
            continue
        auths = {key_of(key): value for key, value in (config.get("auths") or {}).items()
                 if isinstance(value, dict)}
        for key in scopes(host, repository) + (DOCKER_HUB_KEYS if host == "docker.io" else []):
            entry = auths.get(key)
            if entry and entry.get("identitytoken"):
                raise Unsupported(f"{path} has an identity token for {key}")
            if entry and entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, password
        if config.get("credsStore"):
            found = helper_credentials(config["credsStore"], host, path)
            if found:
                return found
    return None


# What a credential helper prints when it holds nothing for the registry.
NOT_FOUND = "credentials not found in native keychain"


def helper_credentials(name, host, path):
    """(user, password) from credential helper NAME (docker-credential-NAME
    get, HOST on its standard input), named in the auth file PATH; None if
    it holds none for HOST.  CdiError with its own message if it fails."""
    from ..workspace import run_briefly  # noqa: PLC0415 (the workspace is podman's)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise CdiError(f"{path}: credential helper {name!r} for {host} is not a helper's name")
    program = f"docker-credential-{name}"
    status, output, errors = run_briefly([program, "get"], host, HELPER_SECONDS)
    if status != 0:
        message = (errors.strip() or output.strip()).splitlines()
        if output.strip() == NOT_FOUND or errors.strip() == NOT_FOUND:
            log.debug(f"{program} holds no credentials for {host}")
            return None
        raise CdiError(f"credentials for {host}: {program} get (named in {path}) exited with "
                       f"status {status}: {message[-1] if message else 'no message'}")
    try:
        answer = json.loads(output)
        user, secret = answer["Username"], answer["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CdiError(f"credentials for {host}: {program} get (named in {path}) printed no "
                       "Username and Secret") from None
    if user == "<token>":
        raise Unsupported(f"{program} gives an identity token for {host}")
    log.debug(f"credentials for {host} from {program}")
    return user, secret


def auth_files(authfile):
    if authfile is not None:
        return [authfile]
    home = os.path.expanduser("~")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.geteuid()}"
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files = [os.environ.get("REGISTRY_AUTH_FILE"), os.path.join(runtime, "containers/auth.json"),
             os.path.join(config, "containers/auth.json"),
             os.path.join(home, ".docker/config.json")]
    return [path for path in files if path]


def key_of(key):
    """An auth file's key as a registry and path: docker's have a scheme."""
    key = re.sub(r"^https?://", "", key)
    return key[:-len("/v1/")] if key.endswith("/v1/") else key.rstrip("/")


def scopes(host, repository):
    """HOST/REPOSITORY and each of its parents, most specific first."""
    parts = repository.split("/")
    return [f"{host}/{'/'.join(parts[:end])}" for end in range(len(parts), 0, -1)] + [host]


def certificates(host, cert_dir=None):
    """([CA files], (certificate, key) or None) from CERT_DIR, else the
    certs.d directories of HOST, as podman reads them."""
    directories = [cert_dir] if cert_dir else [
        os.path.join(os.path.expanduser("~"), ".config/containers/certs.d", host),
        os.path.join("/etc/containers/certs.d", host), os.path.join("/etc/docker/certs.d", host)]
    for directory in directories:
        if os.path.isdir(directory):
            authorities = sorted(glob.glob(os.path.join(directory, "*.crt")))
            pairs = [(path, path[:-len(".cert")] + ".key")
                     for path in sorted(glob.glob(os.path.join(directory, "*.cert")))]
            return authorities, next((pair for pair in pairs if os.path.exists(pair[1])), None)
    return [], None


def registry_config(host, repository):
    """What registries.conf says of HOST/REPOSITORY: insecure, blocked,
    location, mirrors (the entry with the longest matching prefix)."""
    best, best_length = {}, -1
    for path in registries_files():
        try:
            config = read_toml(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            raise Unsupported(f"cannot read {path}: {error}") from None
        version1 = config.get("registries") or {}
        if host in ((version1.get("block") or {}).get("registries") or []):
            raise Unsupported(f"{path} blocks {host}")
        insecure = (version1.get("insecure") or {}).get("registries") or []
        if host in insecure and best_length < len(host):
            best, best_length = {"insecure": True}, len(host)
        for entry in config.get("registry") or []:
            prefix = entry.get("prefix") or entry.get("location") or ""
            if prefix.startswith("*.") and host.split(":")[0].endswith(prefix[1:]):
                raise Unsupported(f"{path} has a wildcard entry for {host} ({prefix})")
            reference = f"{host}/{repository}"
            if (reference == prefix or reference.startswith(prefix.rstrip("/") + "/")
                    or host == prefix) and len(prefix) > best_length:
                best, best_length = {"insecure": entry.get("insecure", False),
                                     "blocked": entry.get("blocked", False),
                                     "location": entry.get("location", prefix),
                                     "mirrors": entry.get("mirror") or []}, len(prefix)
    return best


def registries_files():
    if os.environ.get("CONTAINERS_REGISTRIES_CONF"):
        return [os.environ["CONTAINERS_REGISTRIES_CONF"]]
    user = os.path.join(os.path.expanduser("~"), ".config/containers/registries.conf")
    if os.geteuid() != 0 and os.path.exists(user):
        return [user]
    return (["/etc/containers/registries.conf"]
            + sorted(glob.glob("/etc/containers/registries.conf.d/*.conf")))


def read_toml(path):
    if tomllib is None:
        raise Unsupported("no TOML reader for registries.conf (Python < 3.11 without tomli)")
    with open(path, "rb") as file:
        return tomllib.load(file)
