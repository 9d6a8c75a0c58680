"""An artifact's disk served before it has arrived: read from the registry
a chunk at a time as clients read it, and behind them until whole; kept in
the cache as it comes; checked once whole, then served warm.

The registry is the real Distribution (open, htpasswd, and token auth with
a small token issuer, httplab.TokenIssuer).  Between it and the plugin a
proxy (httplab.Proxy) counts the blob bytes asked for and, where a test
says, flips a byte or cuts a response short: faults a real registry
cannot be made to show.
"""

import base64
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (
    assert_every_read_fails,
    copy_export,
    nbdkit_error,
    params,
    read,
    run_nbdkit,
    serve,
    sha256,
)
from httplab import Proxy, TokenIssuer, certificates
from lab import (
    MIB,
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    Blob,
    export_digest,
    push_artifact,
    push_raw_disk,
    registry,
    wait_for,
    write_oci_layout,
)
from vm import boot, make_boot_disk, token_line

ORAS_LAYER = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 2 * MIB  # cdipy.oci.chunks.CHUNK
SIZE = 32 * MIB
KEPT = "is whole in the cache"  # checked, and a blob of the cache's layout


@pytest.fixture(scope="module")
def blob(lab):
    """(name in the open registry, its bytes): an ORAS artifact of one raw
    disk, SIZE random bytes."""
    return push_raw_disk(lab, "lazy", SIZE)


def copy_all(server, export="disk"):
    """sha256 of the whole export, read with nbdcopy."""
    return export_digest(server.uri(export))


def partial_files(cache):
    """The partial blobs and records in the cache (their empty locks stay)."""
    return [path.name for path in Path(cache, "partial").iterdir() if path.suffix != ".lock"]


def cached_blobs(cache):
    directory = Path(cache, "oci", "blobs", "sha256")
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------- cold

def test_a_cold_start_is_ready_before_the_blob_arrives(lab, blob, proxy, cache):
    name, data = blob
    with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
        assert proxy.blob_bytes <= CHUNK + 1024, "more than the first chunk before ready"
        before = proxy.blob_bytes
        offset = random.randrange(CHUNK * 4, SIZE - 4096) & ~4095
        assert read(server, offset, 4096) == data[offset:offset + 4096]
        assert proxy.blob_bytes - before == CHUNK, "one 4 KiB read costs one chunk"
        assert copy_all(server) == sha256(data)
        wait_for(lambda: KEPT in server.log(), 30, lambda: f"never whole: {server.log()}")
    assert proxy.blob_bytes <= SIZE * 1.02 + 1024
    assert sha256(data)[len("sha256:"):] in cached_blobs(cache)


def test_the_fill_fetches_the_rest_while_clients_read_nothing(lab, blob, proxy, cache):
    name, data = blob
    with serve(lab, *params(proxy, name, cache), verbose=True) as server:
        wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
        log = server.log()
    assert f"{proxy.address}/{name} is whole in the cache" in log
    assert proxy.blob_bytes <= SIZE * 1.02 + 1024
    assert partial_files(cache) == [], "the partial files stay"


def test_a_warm_start_needs_no_registry(lab, blob, cache):
    name, data = blob
    with Proxy(lab.registry) as proxy:
        with serve(lab, *params(proxy, name, cache), verbose=True) as server:
            wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
        address = proxy.address
    # The proxy is gone: the registry at ADDRESS answers no more.
    result = copy_export(f"name={address}/{name}", f"cache={cache}", "tls-verify=false",
                         "layer=disk", verbose=True)
    assert result.digest == sha256(data)
    assert f"using the artifact {address}/{name} from the cache" in result.stderr
    assert "passed its check before, unchanged since" in result.stderr


def test_the_disk_export_says_it_is_read_as_it_arrives(lab, blob, proxy, cache):
    name, _ = blob
    result = run_nbdkit(*params(proxy, name, cache, "layer=disk"), run='nbdinfo --json "$uri"')
    assert result.returncode == 0, result.stderr
    description = json.loads(result.stdout)["exports"][0]["description"]
    assert description.startswith(f"blob 0 of 1: disk.img, {ORAS_LAYER}, sha256:")
    assert description.endswith(f", 32.0 MiB, from {proxy.address} as it is read: raw, 32.0 MiB")


def test_a_vm_boots_from_a_cold_artifact(lab, proxy, cache):
    token = os.urandom(8).hex()
    raw, qcow2 = Path(lab.workdir, "lazy-boot.raw"), Path(lab.workdir, "lazy-boot.qcow2")
    try:
        make_boot_disk(raw, token)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                        str(qcow2)], check=True)
        name = f"cdi-test/lazy-boot:{token}"
        push_artifact(lab.workdir, f"{lab.registry}/{name}",
                      [Blob(ORAS_LAYER, qcow2, "disk.qcow2")])
        with serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
            console = boot(server.uri(), "qcow2")
    finally:
        raw.unlink(missing_ok=True)
        qcow2.unlink(missing_ok=True)
    assert token_line(token) in console


# --------------------------------------------------------- credentials

def authfile(directory, address):
    path = Path(directory, f"auth-{os.urandom(4).hex()}.json")
    secret = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode()).decode()
    path.write_text(json.dumps({"auths": {address: {"auth": secret}}}))
    return path


def test_a_registry_behind_a_password_is_read_as_it_is_read(lab, cache):
    data = os.urandom(3 * MIB)
    name = f"{lab.auth_registry}/cdi-test/lazy-private:1"
    path = Path(lab.workdir, "private.img")
    path.write_bytes(data)
    try:
        push_artifact(lab.workdir, name, [Blob(ORAS_LAYER, path, "disk.img")],
                      authfile=lab.authfile)
    finally:
        path.unlink()
    result = copy_export(f"name={name}", f"cache={cache}", f"authfile={lab.authfile}",
                         "layer=disk", verbose=True)
    assert result.digest == sha256(data)
    assert "as it is read" in result.stderr


def test_a_registry_speaking_tls_is_trusted_through_cert_dir(lab, cache):
    directory = Path(tempfile.mkdtemp(prefix="tls-", dir=lab.workdir))
    cert_dir, pair = certificates(directory)
    data = os.urandom(3 * MIB)
    (directory / "disk.img").write_bytes(data)
    with registry(directory, "tls-registry", tls=pair) as running:
        name = f"{running.address}/cdi-test/lazy-tls:1"
        subprocess.run(["skopeo", "copy", "--quiet", f"--dest-cert-dir={cert_dir}",
                        f"oci:{oci_layout(directory, data)}:latest", f"docker://{name}"],
                       check=True, stdin=subprocess.DEVNULL)
        refused = nbdkit_error(f"name={name}", f"cache={cache}", "layer=disk")
        result = copy_export(f"name={name}", f"cache={cache}", f"cert-dir={cert_dir}",
                             "layer=disk", verbose=True)
    assert "certificate verify failed" in refused or "x509" in refused, refused
    assert result.digest == sha256(data)
    assert f"from {running.address} as it is read" in result.stderr


def oci_layout(directory, data):
    path = Path(directory) / "layout"
    write_oci_layout(path, "latest", [Blob(ORAS_LAYER, data, "disk.img")])
    return path


@pytest.fixture(scope="module")
def token_registry(lab):
    """(a registry in token-auth mode, its issuer): tokens live 2 s."""
    with TokenIssuer(lab.workdir, REGISTRY_USER, REGISTRY_PASSWORD, lifetime=2) as issuer, \
            registry(lab.workdir, "token-registry", token=issuer) as running:
        yield running, issuer


@pytest.fixture(scope="module")
def token_blob(lab, token_registry):
    running, _ = token_registry
    data = os.urandom(8 * MIB)
    path = Path(lab.workdir, "token.img")
    path.write_bytes(data)
    name = f"{running.address}/cdi-test/lazy-token:1"
    try:
        push_artifact(lab.workdir, name, [Blob(ORAS_LAYER, path, "disk.img")],
                      authfile=authfile(lab.workdir, running.address))
    finally:
        path.unlink()
    return name, data


@pytest.mark.parametrize("who", ["anonymous", "with a password"])
def test_the_token_flow_of_a_registry_that_wants_one(lab, token_blob, cache, who):
    name, data = token_blob
    extra = [f"authfile={authfile(lab.workdir, name.split('/')[0])}"] \
        if who != "anonymous" else []
    result = copy_export(f"name={name}", f"cache={cache}", "tls-verify=false", "layer=disk",
                         *extra, verbose=True)
    assert result.digest == sha256(data)
    assert "a token from http://127.0.0.1:" in result.stderr


def test_an_expired_token_is_renewed(lab, token_registry, token_blob, cache):
    _, issuer = token_registry
    name, data = token_blob
    before = issuer.issued
    with serve(lab, f"name={name}", f"cache={cache}", "tls-verify=false", "layer=disk",
               verbose=True) as server:
        # cdi.py renews a token TOKEN_MARGIN before it expires, a second
        # after it came at the soonest: here, where tokens live 2 s, the
        # fill's first request, once clients have read nothing for a second.
        start_up = server.log().partition("python: after_fork")[0]
        tokens = before + start_up.count("a token from ")
        assert tokens > before, f"no token at start-up: {start_up}"
        assert issuer.wait_issued(tokens + 1, timeout=60), \
            f"no token renewed: {server.log()}"
        assert read(server, 6 * MIB, 4096) == data[6 * MIB:6 * MIB + 4096]
        wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")


def test_a_redirect_to_blob_storage_carries_no_authorization(lab, cache):
    data = os.urandom(3 * MIB)
    path = Path(lab.workdir, "redirected.img")
    path.write_bytes(data)
    repository = "cdi-test/lazy-redirected:1"
    try:
        for address, extra in ((lab.registry, {}), (lab.auth_registry,
                                                    {"authfile": lab.authfile})):
            push_artifact(lab.workdir, f"{address}/{repository}",
                          [Blob(ORAS_LAYER, path, "disk.img")], **extra)
    finally:
        path.unlink()
    # Blob requests to the password registry are sent on to "storage": the
    # open registry, on another port.
    with Proxy(lab.registry) as storage, Proxy(lab.auth_registry) as front:
        front.redirect = storage.address
        auth = authfile(lab.workdir, front.address)
        result = copy_export(f"name={front.address}/{repository}", f"cache={cache}",
                             "tls-verify=false", f"authfile={auth}", "layer=disk")
    assert result.digest == sha256(data)
    assert any(front.authorizations), "the registry was asked without credentials"
    assert storage.authorizations and not any(storage.authorizations)


# ----------------------------------------------------------------- faults

def test_a_registry_gone_mid_serve_keeps_serving_what_arrived(lab, blob, cache):
    name, data = blob
    with Proxy(lab.registry) as proxy, \
            serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
        assert read(server, 0, 4096) == data[:4096]
        proxy.server.shutdown()
        proxy.server.server_close()
        assert read(server, 100, 4096) == data[100:4196]  # chunk 0 is here
        started = time.monotonic()
        handle = server.connect("disk")
        try:
            with pytest.raises(Exception, match="Input/output error"):
                handle.pread(4096, 20 * MIB)
        finally:
            handle.shutdown()
        assert time.monotonic() - started < 60
    # What the read was told, after RETRY_SECONDS of tries: the chunk it
    # needed, and why the registry gave it not.
    log = server.log()
    assert (f"pread: error: reading layer 0 at offset {20 * MIB}: {proxy.address}/{name}: "
            f"blob {sha256(data)} bytes {20 * MIB}-{22 * MIB - 1}: {proxy.address}: ") in log, log
    assert "Connection refused" in log, log


def test_a_flipped_byte_fails_every_read_once_whole_and_the_next_start_fetches_anew(
        lab, blob, cache):
    name, data = blob
    with Proxy(lab.registry) as proxy:
        with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
            # The next chunk the fill fetches (it waits a second for clients
            # that read nothing here); then it checks the whole.  (What a
            # client reads before then is served as it arrived: README, verify=.)
            proxy.flip = True
            wait_for(lambda: "refusing to serve it" in server.log(), 60, server.log)
            assert_every_read_fails(server, SIZE, CHUNK)
            log = server.log()
        assert f"verify: blob {sha256(data)} from {proxy.address} hashes to sha256:" in log
        assert cached_blobs(cache) == [], "a blob that failed its check was kept"
        assert partial_files(cache) == [], "the partial blob stays"
        result = copy_export(*params(proxy, name, cache, "layer=disk"))
    assert result.digest == sha256(data)


def test_a_response_cut_short_is_fetched_again(lab, blob, proxy, cache):
    name, data = blob
    with serve(lab, *params(proxy, name, cache, "layer=disk"), verbose=True) as server:
        proxy.cut = True  # a chunk a client asks for
        assert copy_all(server) == sha256(data)
        assert "trying again in" in server.log()


def test_sigkill_leaves_a_partial_blob_the_next_start_resumes(lab, blob, proxy, cache):
    name, data = blob
    with serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
        for offset in range(0, SIZE // 2, CHUNK):
            read(server, offset, 4096)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    assert cached_blobs(cache) == [], "a blob named whole after SIGKILL"
    fetched = proxy.blob_bytes
    assert fetched >= SIZE // 2
    result = copy_export(*params(proxy, name, cache, "layer=disk"))
    assert result.digest == sha256(data)
    assert proxy.blob_bytes - fetched <= SIZE // 2 + CHUNK + 1024, "fetched again"


def test_two_servers_on_one_blob_both_serve_it_whole(lab, blob, proxy, cache):
    name, data = blob
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: copy_export(
            *params(proxy, name, cache, "layer=disk")), range(2)))
    for result in results:
            assert result.digest == sha256(data)
    assert sha256(data)[len("sha256:"):] in cached_blobs(cache)


def test_a_full_cache_is_a_clear_error(lab, blob, proxy):
    name, _ = blob
    cache = Path(tempfile.mkdtemp(prefix="full-cache-", dir=lab.workdir))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(cache)],
                   check=True)
    try:
        with serve(lab, *params(proxy, name, str(cache), "layer=disk")) as server:
            handle = server.connect("disk")
            try:
                with pytest.raises(Exception, match="Input/output error"):
                    for offset in range(0, SIZE, CHUNK):
                        handle.pread(4096, offset)
            finally:
                handle.shutdown()
            log = server.log()
    finally:
        subprocess.run(["umount", str(cache)], check=True)
        cache.rmdir()
    assert "cannot keep sha256:" in log and "No space left on device" in log


def test_a_damaged_index_is_set_aside_and_the_artifact_fetched_again(lab, blob, proxy, cache):
    name, data = blob
    with serve(lab, *params(proxy, name, cache), verbose=True) as server:
        wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
    index = Path(cache, "oci", "index.json")
    index.write_bytes(index.read_bytes()[:20])  # cut short, as a crash would
    result = copy_export(*params(proxy, name, cache, "layer=disk"), verbose=True)
    assert result.digest == sha256(data)
    assert f"the cache's {index} is damaged" in result.stderr
    assert list(index.parent.glob("index.json.damaged-*"))


def test_pull_never_does_not_serve_a_partial_blob(lab, blob, proxy, cache):
    name, _ = blob
    with serve(lab, *params(proxy, name, cache, "layer=disk")) as server:
        read(server, 0, 4096)
    message = nbdkit_error(*params(proxy, name, cache, "pull=never"))
    assert "image not found in local storage nor in the cache (pull=never)" in message



def test_pull_always_reads_the_manifest_again_and_serves_a_whole_blob_from_the_cache(
        lab, blob, proxy, cache):
    name, data = blob
    with serve(lab, *params(proxy, name, cache), verbose=True) as server:
        wait_for(lambda: KEPT in server.log(), 60, lambda: f"never whole: {server.log()}")
    fetched = proxy.blob_bytes
    result = copy_export(*params(proxy, name, cache, "pull=always", "layer=disk"), verbose=True)
    assert result.digest == sha256(data)
    assert f"{proxy.address}/{name}: manifest sha256:" in result.stderr
    assert ", 32.0 MiB, from the cache: raw" in result.stderr
    assert proxy.blob_bytes == fetched, "a whole cached blob was fetched again"
