"""The registry itself, over HTTP: manifests, and ranges of blobs, from
the sources registries.conf gives the image (its mirrors, then the
primary; see registries_conf.py), each with the credentials and TLS
settings podman would use for it.

What podman would use: the credentials of registries.conf's
credential-helpers in order (by default the auth files alone): the auth
files are those of authfile=, else podman's own (REGISTRY_AUTH_FILE,
$XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json,
~/.docker/config.json), a file's credential helper (credHelpers,
credsStore) asked for its host; any other helper NAME is
docker-credential-NAME, asked for the host; the
certificates of cert-dir=, else of /etc/containers/certs.d/HOST (CAs
*.crt, a client certificate *.cert with its *.key); tls-verify=, else the
source's "insecure" (then plain HTTP is tried too).  Credentials and
certificates are the source's own host's: a mirror never receives the
primary's.  Every registry's token flow (Bearer, anonymous too) and basic
auth are spoken here; a redirect to blob storage never carries our
Authorization (requests drops it for another host).

The manifest comes from the first source that gives it, as containers/image
does; blobs from that source, and, where it fails, from the next: every
byte is checked against a digest, so a blob begun on a mirror that dies may
end on the primary (containers/image gives up there).  What this cannot
honour (an identity token, an HTTP proxy in the environment) raises
Unsupported, so that the caller takes the whole fetch instead.
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

from ..errors import CdiError, NoSource, RegistryError, Unsupported
from . import registries_conf
from .fetch import api_host
from .layout import INDEX_TYPES, MANIFEST_TYPES

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
    """Image IMAGE_NAME, repository REPOSITORY of registry HOST (host[:port],
    as the image's name says it: registries.conf and auth files name it so)
    at REFERENCE (a tag or a digest), from its sources, as SETTINGS
    (parameters.Settings) and registries.conf say to reach them.  A source
    is reached (its credentials asked for) only once it is tried."""

    def __init__(self, host, repository, image_name, settings, reference="latest"):
        self.host, self.repository, self.image_name = host, repository, image_name
        self.reference, self.settings = reference, settings
        config = registries_conf.load()
        try:
            self.sources = registries_conf.pull_sources(config, host, repository, reference)
        except NoSource as error:
            raise NoSource(f"{image_name}: {error}") from None
        self.helpers = (config.credential_helpers, config.helpers_file)
        for source in self.sources:
            if urllib.request.getproxies() and \
                    not urllib.request.proxy_bypass(source.host.split(":")[0]):
                raise Unsupported("the environment names an HTTP proxy")
        self.lock = threading.Lock()
        self.endpoints = {}          # source index -> its Endpoint, once tried
        self.preferred = 0           # the source that answered last: tried first

    def manifest(self, reference):
        """(bytes, media type, digest) of manifest REFERENCE (a tag or digest),
        checked against the digest when REFERENCE is one; the image's own
        reference is asked of each source as that source names it."""
        return self.attempt(
            lambda endpoint, source: endpoint.manifest(
                source.reference if reference == self.reference else reference),
            f"manifest {reference}")

    def blob_range(self, digest, start, end):
        """Bytes START to END (excluded) of blob DIGEST, from the source that
        answered last, else the next that answers."""
        return self.attempt(lambda endpoint, _: endpoint.blob_range(digest, start, end),
                            f"blob {digest} bytes {start}-{end - 1}")

    def blob_range_or_whole(self, digest, start, end, piece):
        """Bytes START to END (excluded) of blob DIGEST, as blob_range; or,
        where the source answers the range with the whole blob (a
        pull-through cache that does not hold it yet: Distribution's proxy
        mode, Harbor), a WholeAnswer: that answer's pieces of PIECE bytes
        from byte 0, so that the caller keeps all of it."""
        return self.attempt(
            lambda endpoint, _: endpoint.blob_range(digest, start, end, whole_pieces=piece),
            f"blob {digest} bytes {start}-{end - 1}")

    def blob_pieces(self, digest, start, piece):
        """Yield blob DIGEST from byte START to its end, PIECE bytes at a
        time, from the first source that answers; RegistryError (transient)
        if the answer breaks off (asked again, the next source may answer)."""
        endpoint, response = self.attempt(
            lambda endpoint, _: (endpoint, endpoint.open_blob(digest, start)),
            f"blob {digest} from byte {start}")
        yield from endpoint.read_pieces(response, digest, start, piece)

    def attempt(self, call, what):
        """CALL(endpoint, source) on the preferred source, then on each other
        in order, until one returns; that one is preferred from then on.
        If every one fails: one source's error as it is; several, NoSource
        (or Unsupported, if each was) naming each source and its error."""
        preferred = self.preferred
        order = [preferred] + [index for index in range(len(self.sources))
                               if index != preferred]
        failures = []
        for index in order:
            source = self.sources[index]
            try:
                if source.blocked:
                    raise NoSource(f"{self.image_name}: {what}: {source.blocked}")
                result = call(self.endpoint(index), source)
            except (CdiError, Unsupported) as error:
                log.debug(f"{self.image_name}: {what}: {source.name()} failed: {error}")
                failures.append((source, error))
                continue
            if failures and index != preferred:
                log.debug(f"{self.image_name}: {what}: continuing from {source.name()}: "
                          "every byte is checked against its digest, so a blob begun on "
                          "one source may end on another (containers/image would give up)")
            self.preferred = index
            return result
        if len(failures) == 1:
            raise failures[0][1]
        said = "; ".join(f"[{source.name()}: {self.unprefixed(error, what)}]"
                         for source, error in failures)
        message = f"{self.image_name}: {what}: every source failed: {said}"
        if all(isinstance(error, Unsupported) for _, error in failures):
            raise Unsupported(message)
        # Every source answering alike (404: no such tag anywhere) says so.
        statuses = {getattr(error, "status", None) for _, error in failures}
        raise NoSource(message, transient=any(getattr(error, "transient", False)
                                              for _, error in failures),
                       status=statuses.pop() if len(statuses) == 1 else None)

    def unprefixed(self, error, what):
        """ERROR's message without the image's name and WHAT, said once."""
        message = str(error)
        for prefix in (f"{self.image_name}: ", f"{what}: "):
            message = message[len(prefix):] if message.startswith(prefix) else message
        return message

    def endpoint(self, index):
        """The Endpoint of source INDEX, made at its first use."""
        with self.lock:
            endpoint = self.endpoints.get(index)
            if endpoint is None:
                endpoint = Endpoint(self.sources[index], self.image_name, self.settings,
                                    self.helpers)
                self.endpoints[index] = endpoint
            return endpoint


class Endpoint:
    """One source of an image (a registries_conf.Source), for IMAGE_NAME, as
    SETTINGS say to reach it: its own credentials (from HELPERS, registries.conf's
    credential-helpers and the file that names them), certificates and TLS."""

    def __init__(self, source, image_name, settings,
                 helpers=((registries_conf.AUTH_FILES,), "")):
        self.host, self.repository, self.image_name = \
            source.host, source.repository, image_name
        self.api_host = api_host(source.host)
        self.insecure = (not settings.tls_verify if settings.tls_verify is not None
                         else source.insecure)
        self.credentials = credentials(source.host, source.repository, settings.authfile,
                                       *helpers)
        self.certificates = certificates(source.host, settings.cert_dir)
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

    def blob_range(self, digest, start, end, whole_pieces=None):
        """Bytes START to END (excluded) of blob DIGEST; RegistryError if the
        registry answers another range, or fewer bytes.  With WHOLE_PIECES
        (a size), a whole blob answered instead is a WholeAnswer of pieces
        of that size."""
        # The bytes as stored: a compressed answer would be other bytes.
        response = self.get(f"blobs/{digest}", headers={"Range": f"bytes={start}-{end - 1}",
                                                        "Accept-Encoding": "identity"},
                            what=f"blob {digest} bytes {start}-{end - 1}", stream=True)
        whole = response.status_code == 200 and "Content-Range" not in response.headers
        if whole and whole_pieces:
            log.debug(f"{self.api_host} answered bytes {start}-{end - 1} of {digest} with "
                      "the whole blob")
            return WholeAnswer(response, self.read_pieces(response, digest, 0, whole_pieces))
        with contextlib.closing(response):
            if start == 0 and whole:
                # The blob's start is the answer's: what a pull-through
                # cache sends while it fetches the blob itself.
                return self.read_exactly(response, digest, start, end, whole=True)
            if response.status_code != 206:
                raise Unsupported(f"{self.api_host} answered a range of blob {digest} with "
                                  f"HTTP {response.status_code}, not 206")
            got = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/.*",
                               response.headers.get("Content-Range", ""))
            if not got or (int(got.group(1)), int(got.group(2)) + 1) != (start, end):
                raise RegistryError(f"{self.image_name}: the registry sent "
                                    f"{response.headers.get('Content-Range')!r} for bytes "
                                    f"{start}-{end - 1} of {digest}")
            return self.read_exactly(response, digest, start, end)

    def read_exactly(self, response, digest, start, end, whole=False):
        """The END - START bytes RESPONSE's body holds: a range answer must
        hold no more (one byte more is asked to see), a WHOLE blob's rest
        is left unread."""
        try:
            data = response.raw.read(end - start + (0 if whole else 1), decode_content=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise RegistryError(f"{self.image_name}: reading blob {digest}: {error}",
                                transient=True) from None
        if len(data) != end - start:
            raise RegistryError(f"{self.image_name}: the registry sent {len(data)} bytes of "
                                f"{end - start} of blob {digest}", transient=True)
        return data

    def open_blob(self, digest, start):
        """The answer that holds blob DIGEST from byte START, as stored."""
        headers = {"Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        response = self.get(f"blobs/{digest}", headers=headers,
                            what=f"blob {digest} from byte {start}", stream=True)
        whole = response.status_code == 200 and "Content-Range" not in response.headers
        if start and not whole and (response.status_code != 206 or not response.headers.get(
                "Content-Range", "").startswith(f"bytes {start}-")):
            response.close()
            raise RegistryError(f"{self.image_name}: {self.api_host} answered bytes "
                                f"{start}- of blob {digest} with HTTP "
                                f"{response.status_code} "
                                f"{response.headers.get('Content-Range')!r}")
        return response

    def read_pieces(self, response, digest, start, piece):
        """Yield RESPONSE's body from byte START of blob DIGEST, PIECE bytes
        at a time; a whole blob (a pull-through cache answers a Range so
        while it fetches the blob itself) read up to START first."""
        skip = start if start and response.status_code == 200 else 0
        if skip:
            log.debug(f"{self.api_host} answered bytes {start}- of {digest} with the whole "
                      "blob: skipping what has arrived already")
        with contextlib.closing(response):
            while True:
                try:
                    data = response.raw.read(piece if not skip else min(piece, skip),
                                             decode_content=False)
                except (requests.RequestException, urllib3.exceptions.HTTPError,
                        OSError) as error:
                    raise RegistryError(f"{self.image_name}: reading blob {digest}: {error}",
                                        transient=True) from None
                if not data:
                    if skip:
                        raise RegistryError(f"{self.image_name}: reading blob {digest}: the "
                                            f"answer ends before byte {start}", transient=True)
                    return
                if skip:
                    skip -= len(data)
                    continue
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


class WholeAnswer:
    """A source's answer to a range with the whole blob (what a pull-through
    cache sends while it fetches the blob itself): iterated, its pieces from
    byte 0 in order (RegistryError, transient, if it breaks off); closed
    once read, or to leave the rest unread."""

    def __init__(self, response, pieces):
        self.response, self.pieces = response, pieces

    def __iter__(self):
        return self.pieces

    def close(self):
        self.pieces.close()
        self.response.close()


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

def credentials(host, repository, authfile=None, helpers=(registries_conf.AUTH_FILES,),
                helpers_file=""):
    """(user, password) for HOST/REPOSITORY from the first of HELPERS
    (registries.conf's credential-helpers, set in HELPERS_FILE) that gives
    some, or None (anonymous): "containers-auth.json" the auth files, any
    other NAME docker-credential-NAME.  As containers/image does, one that
    fails is passed over, its error raised only if none gives any.
    Unsupported for an identity token, which only podman can use."""
    failures = []
    for helper in helpers:
        try:
            found = (auth_file_credentials(host, repository, authfile)
                     if helper == registries_conf.AUTH_FILES
                     else helper_credentials(helper, host, f"{helpers_file} credential-helpers"))
        except CdiError as error:
            log.debug(f"credentials for {host} from {helper}: {error}")
            failures.append(error)
            continue
        if found:
            return found
    if len(failures) > 1:
        raise CdiError(f"credentials for {host}: every credential helper failed: "
                       + "; ".join(f"[{error}]" for error in failures))
    if failures:
        raise failures[0]
    return None


def auth_file_credentials(host, repository, authfile=None):
    """(user, password) for HOST/REPOSITORY from the first auth file podman
    would read that gives some, or None.  In each file: its credHelpers
    entry for HOST (that helper alone), else its auths entry (the most
    specific key), else its credsStore helper."""
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
