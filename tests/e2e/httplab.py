"""HTTP pieces of the lab: a token issuer for a Distribution registry in
token-auth mode, and a proxy in front of a registry that counts what it
carries and, on demand, adds round trips, flips a byte or cuts a response
short: faults a real registry cannot be made to show.

The issuer is what Docker Hub, quay and ghcr run beside their registries:
GET /token?service=...&scope=repository:NAME:pull, anonymous or with basic
auth, answers a JWT (ES256, its certificate in the x5c header) that the
registry checks against its rootcertbundle.
"""

import base64
import datetime
import http.client
import http.server
import io
import ipaddress
import json
import os
import socketserver
import threading
import time
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

SERVICE = "cdi-test-registry"
ISSUER = "cdi-test-issuer"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class TokenIssuer:
    """Issues tokens for a registry, on 127.0.0.1: pull for anyone, push
    and pull for USER with PASSWORD; each lives LIFETIME seconds.  Use as a
    context manager; certificate is the file for the registry's
    rootcertbundle, issued counts the tokens given (wait_issued waits for
    a count)."""

    def __init__(self, directory, user, password, lifetime=300, anonymous=True):
        self.user, self.password, self.lifetime = user, password, lifetime
        self.anonymous = anonymous
        self.issued = 0  # guarded by self.changed
        self.changed = threading.Condition()
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .sign(self.key, hashes.SHA256()))
        self.certificate = Path(directory) / "token-issuer.pem"
        self.certificate.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def __enter__(self):
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                issuer.answer(self)

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(request.path).query)
        user = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (user, password) != (self.user, self.password):
                return self.reply(request, 401, {"details": "bad password"})
        elif not self.anonymous:
            return self.reply(request, 401, {"details": "authentication required"})
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            wanted = actions.split(",")
            allowed = wanted if user else [action for action in wanted if action == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        token = self.token(user or "", access)
        self.reply(request, 200, {"token": token, "expires_in": self.lifetime})
        with self.changed:
            self.issued += 1
            self.changed.notify_all()

    def wait_issued(self, count, timeout):
        """Whether COUNT tokens in all have been given, waiting TIMEOUT
        seconds at most."""
        with self.changed:
            return self.changed.wait_for(lambda: self.issued >= count, timeout)

    def token(self, subject, access):
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(
                      serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + self.lifetime,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = (b64url(json.dumps(header).encode()) + "."
                         + b64url(json.dumps(claims).encode()))
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    @staticmethod
    def reply(request, status, body):
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def registry_config(self):
        """The registry's auth section for this issuer."""
        return (f"auth: {{token: {{realm: '{self.realm}', service: {SERVICE}, "
                f"issuer: {ISSUER}, rootcertbundle: '{self.certificate}'}}}}")


def send_on(connection, request, leave_out=("connection",)):
    """REQUEST's method, path and headers but those named in LEAVE_OUT
    (lower case), sent on CONNECTION header by header: a client may send
    one several times (skopeo's Accept)."""
    connection.putrequest(request.command, request.path, skip_host=True,
                          skip_accept_encoding=True)
    for key, value in request.headers.items():
        if key.lower() not in leave_out:
            connection.putheader(key, value)
    connection.endheaders()


def certificates(directory, host="127.0.0.1"):
    """A CA (DIRECTORY/certs.d/ca.crt, as podman's cert-dir holds it) and a
    server certificate it signed for HOST; (cert-dir, (certificate, key))."""
    def key_and_name(common_name):
        return ec.generate_private_key(ec.SECP256R1()), x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_name = key_and_name("cdi-test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key, name = key_and_name(host)
    server = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(
                  [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    cert_dir = Path(directory) / "certs.d"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certificate, private = Path(directory) / "server.crt", Path(directory) / "server.key"
    certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_dir, (certificate, private)


class Proxy:
    """An HTTP proxy on 127.0.0.1 in front of the registry at UPSTREAM
    (host:port): what a client sends is passed on, what the registry
    answers is passed back, counted in blob_bytes.  Set delay (seconds
    added to each request), flip (True: one byte of the next blob range
    is flipped; "every": of every blob range from now on), cut (True:
    the next blob range stops halfway), redirect (an address: blob
    requests are sent there with a 307), rate (bytes a second: blobs are
    sent no faster) or ignore_range (True: Range is not passed on, so each
    blob is answered whole, as by a registry that ignores it); with aim set (a
    digest), flip and cut wait for a request of that blob.  stop() is the
    registry gone: answers being sent break off, new ones are refused."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.blob_bytes = 0
        self.blob_requests = 0
        self.delay = 0.0
        self.flip = self.cut = False
        self.redirect = None
        self.rate = self.aim = None
        self.ignore_range = False
        self.gone = False
        self.authorizations = []  # the Authorization header of each blob request
        self.lock = threading.Lock()

    def __enter__(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                proxy.forward(self)

            def do_HEAD(self):  # noqa: N802
                proxy.forward(self)

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        if not self.gone:
            self.stop()

    def stop(self):
        self.gone = True
        self.server.shutdown()
        self.server.server_close()

    def forward(self, request):
        if self.delay:
            time.sleep(self.delay)
        blob = "/blobs/" in request.path
        aimed = blob and (self.aim is None or request.path.endswith(f"/blobs/{self.aim}"))
        with self.lock:
            if blob:
                self.blob_requests += 1
                self.authorizations.append(request.headers.get("Authorization"))
            flip = bool(self.flip) and aimed
            if self.flip is True:
                self.flip = not aimed
            cut, self.cut = self.cut and aimed, self.cut and not aimed
        if blob and self.redirect:
            request.send_response(307)
            request.send_header("Location", f"http://{self.redirect}{request.path}")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        host, port = self.upstream.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            send_on(connection, request, ("connection", "range") if self.ignore_range
                    else ("connection",))
            response = connection.getresponse()
        except OSError:
            connection.close()
            request.send_error(502)
            return
        try:
            # Passed on as it comes (a whole blob streams through), unless
            # the registry gives no length.
            length = response.getheader("Content-Length")
            body = response if length is not None else io.BytesIO(response.read())
            length = int(length) if length is not None else len(body.getvalue())
            request.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                    request.send_header(key, value.replace(self.upstream, self.address))
            request.send_header("Content-Length", str(length))
            request.end_headers()
            if request.command == "GET" and not self.send_body(
                    request, body, length, blob=blob, flip=flip, cut=cut):
                request.close_connection = True
                request.connection.shutdown(2)
        except OSError:  # the client, or the registry, went away
            request.close_connection = True
        finally:
            connection.close()

    def send_body(self, request, body, length, *, blob, flip, cut):
        """Send LENGTH bytes of BODY (a file), counted if a BLOB's; the one
        in the middle flipped if FLIP, half of them if CUT; whether whole."""
        middle, end = length // 2, length // 2 if cut else length
        sent = 0
        while sent < end:
            if self.gone:
                return False
            data = body.read(min(64 << 10, end - sent))
            if not data:
                return False
            if flip and sent <= middle < sent + len(data):
                data = data[:middle - sent] + bytes([data[middle - sent] ^ 0xFF]) \
                    + data[middle - sent + 1:]
            request.wfile.write(data)
            sent += len(data)
            if blob:
                with self.lock:
                    self.blob_bytes += len(data)
            if blob and self.rate:
                time.sleep(len(data) / self.rate)
        return not cut
