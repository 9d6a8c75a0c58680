"""Reaching a registry as podman would: which credentials, certificates and
registries.conf entry apply, and how a name becomes the registry's API
path.  Plain files in tmp_path; no network."""

import base64
import json
import os

import pytest

from cdipy.errors import CdiError, NoSource, RegistryError, Unsupported
from cdipy.oci.fetch import (
    api_host,
    is_compressed,
    lazily_servable,
    probe_ranges,
    split_reference,
)
from cdipy.oci.registry import (
    Registry,
    certificates,
    credentials,
    key_of,
    scopes,
)
from cdipy.parameters import Settings


def auth_file(tmp_path, config):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(config))
    return str(path)


def secret(user, password):
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_of_the_registry(tmp_path):
    path = auth_file(tmp_path, {"auths": {"quay.io": {"auth": secret("me", "pw:with:colons")}}})
    assert credentials("quay.io", "org/disk", path) == ("me", "pw:with:colons")


def test_the_most_specific_entry_wins(tmp_path):
    path = auth_file(tmp_path, {"auths": {"quay.io": {"auth": secret("any", "1")},
                                          "quay.io/org": {"auth": secret("org", "2")}}})
    assert credentials("quay.io", "org/disk", path) == ("org", "2")
    assert credentials("quay.io", "other/disk", path) == ("any", "1")


def test_a_docker_style_key_with_a_scheme_names_the_registry(tmp_path):
    path = auth_file(tmp_path, {"auths": {"https://index.docker.io/v1/":
                                          {"auth": secret("d", "3")}}})
    assert credentials("index.docker.io", "library/x", path) == ("d", "3")


def test_no_entry_is_anonymous(tmp_path):
    assert credentials("ghcr.io", "org/disk", auth_file(tmp_path, {"auths": {}})) is None


def helper(tmp_path, monkeypatch, name, script):
    """docker-credential-NAME on PATH: a shell script (its body SCRIPT) that
    keeps what it was given on stdin in tmp_path/asked."""
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    program = directory / f"docker-credential-{name}"
    program.write_text(f"#!/bin/sh\ncat > {tmp_path}/asked; echo \"$@\" >> {tmp_path}/asked\n"
                       + script)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")


ANSWER = 'echo \'{"ServerURL": "x", "Username": "robot", "Secret": "s3cret"}\'\n'


def test_a_credential_helper_is_asked_for_its_registry(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "ecr-login", ANSWER)
    path = auth_file(tmp_path, {"auths": {"ecr.example": {"auth": secret("no", "no")}},
                                "credHelpers": {"ecr.example": "ecr-login"}})
    assert credentials("ecr.example", "org/disk", path) == ("robot", "s3cret")
    assert (tmp_path / "asked").read_text() == "ecr.exampleget\n"


def test_creds_store_serves_a_registry_the_file_does_not_name(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "desktop", ANSWER)
    path = auth_file(tmp_path, {"auths": {"quay.io": {"auth": secret("q", "1")}},
                                "credsStore": "desktop"})
    assert credentials("quay.io", "org/disk", path) == ("q", "1")
    assert credentials("gcr.example", "org/disk", path) == ("robot", "s3cret")


def test_a_helper_that_holds_nothing_is_anonymous(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "pass",
           "echo 'credentials not found in native keychain'; exit 1\n")
    path = auth_file(tmp_path, {"credHelpers": {"h": "pass"}})
    assert credentials("h", "disk", path) is None


def test_a_failing_helper_says_why(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "broken", "echo 'token expired, log in again' >&2; exit 3\n")
    path = auth_file(tmp_path, {"credHelpers": {"h": "broken"}})
    with pytest.raises(CdiError) as error:
        credentials("h", "disk", path)
    assert str(error.value) == (f"credentials for h: docker-credential-broken get (named in "
                                f"{path}) exited with status 3: token expired, log in again")


def test_a_missing_helper_says_what_to_install(tmp_path):
    path = auth_file(tmp_path, {"credHelpers": {"h": "absent-helper"}})
    with pytest.raises(CdiError, match="docker-credential-absent-helper: command not found"):
        credentials("h", "disk", path)


def test_a_helpers_name_is_never_a_path(tmp_path):
    path = auth_file(tmp_path, {"credHelpers": {"h": "../../bin/sh"}})
    with pytest.raises(CdiError, match="is not a helper's name"):
        credentials("h", "disk", path)


def test_a_helper_that_hangs_is_stopped(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "slow", "exec sleep 30\n")
    monkeypatch.setattr("cdipy.oci.registry.HELPER_SECONDS", 0.5)
    path = auth_file(tmp_path, {"credHelpers": {"h": "slow"}})
    with pytest.raises(CdiError, match="docker-credential-slow: no answer after 0.5 s"):
        credentials("h", "disk", path)


def test_an_identity_token_from_a_helper_cannot_be_honoured(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "acr",
           'echo \'{"Username": "<token>", "Secret": "refresh"}\'\n')
    path = auth_file(tmp_path, {"credHelpers": {"acr.example": "acr"}})
    with pytest.raises(Unsupported, match="gives an identity token for acr.example"):
        credentials("acr.example", "disk", path)


# registries.conf's credential-helpers: "containers-auth.json" the auth files.
AUTH_FILES = "containers-auth.json"
NOT_HELD = "echo 'credentials not found in native keychain'; exit 1\n"


def test_credential_helpers_are_asked_in_registries_confs_order(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "vault", ANSWER)
    path = auth_file(tmp_path, {"auths": {"h.example": {"auth": secret("file", "1")}}})
    assert credentials("h.example", "disk", path, (AUTH_FILES, "vault")) == ("file", "1")
    assert not (tmp_path / "asked").exists(), "a helper after the one that answered was asked"
    assert credentials("h.example", "org/disk", path, ("vault", AUTH_FILES)) == \
        ("robot", "s3cret")
    assert (tmp_path / "asked").read_text() == "h.exampleget\n", "asked for the host alone"


def test_by_default_the_auth_files_alone_are_read(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "vault", ANSWER)
    assert credentials("h.example", "disk", auth_file(tmp_path, {"auths": {}})) is None
    assert not (tmp_path / "asked").exists()


def test_a_helper_holding_nothing_is_passed_over(tmp_path, monkeypatch):
    helper(tmp_path, monkeypatch, "empty", NOT_HELD)
    path = auth_file(tmp_path, {"auths": {"h.example": {"auth": secret("file", "1")}}})
    assert credentials("h.example", "disk", path, ("empty", AUTH_FILES)) == ("file", "1")
    assert credentials("h.example", "disk", auth_file(tmp_path, {}), ("empty",)) is None


def test_a_failing_helper_is_passed_over_and_said_only_if_none_answers(tmp_path, monkeypatch):
    # containers/image's order: errors are kept, and raised if no helper
    # gives credentials.
    helper(tmp_path, monkeypatch, "broken", "echo 'token expired' >&2; exit 3\n")
    path = auth_file(tmp_path, {"auths": {"h.example": {"auth": secret("file", "1")}}})
    conf = "/etc/containers/registries.conf"
    assert credentials("h.example", "disk", path, ("broken", AUTH_FILES), conf) == ("file", "1")
    with pytest.raises(CdiError) as error:
        credentials("h.example", "disk", auth_file(tmp_path, {}), ("broken", "absent"), conf)
    assert str(error.value) == (
        "credentials for h.example: every credential helper failed: "
        "[credentials for h.example: docker-credential-broken get (named in "
        f"{conf} credential-helpers) exited with status 3: token expired]; "
        "[docker-credential-absent: command not found (install docker-credential-absent)]")


def test_an_identity_token_cannot_be_honoured(tmp_path):
    path = auth_file(tmp_path, {"auths": {"acr.example": {"identitytoken": "x"}}})
    with pytest.raises(Unsupported, match="identity token"):
        credentials("acr.example", "disk", path)


def test_keys_and_scopes():
    assert key_of("https://quay.io/") == "quay.io"
    assert key_of("https://index.docker.io/v1/") == "index.docker.io"
    assert scopes("h:5000", "a/b/c") == ["h:5000/a/b/c", "h:5000/a/b", "h:5000/a", "h:5000"]


def test_certificates_of_a_cert_dir(tmp_path):
    for name in ("ca.crt", "client.cert", "client.key", "other.cert"):
        (tmp_path / name).write_text("x")
    assert certificates("h", str(tmp_path)) == (
        [str(tmp_path / "ca.crt")], (str(tmp_path / "client.cert"), str(tmp_path / "client.key")))


@pytest.mark.parametrize("name, expected", [
    ("quay.io/org/disk:1", ("quay.io", "org/disk", "1")),
    ("h:5000/a/b/c", ("h:5000", "a/b/c", "latest")),
    ("ghcr.io/o/d@sha256:" + "1" * 64, ("ghcr.io", "o/d", "sha256:" + "1" * 64)),
    ("docker.io/cirros:0.6", ("docker.io", "library/cirros", "0.6")),
    ("docker.io/kubevirt/vm:1", ("docker.io", "kubevirt/vm", "1")),
])
def test_split_reference(name, expected):
    assert split_reference(name) == expected


def test_docker_hubs_api_is_elsewhere_but_its_name_is_docker_io():
    # registries.conf and auth files name docker.io; only the URL changes.
    assert (api_host("docker.io"), api_host("quay.io")) == ("registry-1.docker.io", "quay.io")


def test_docker_hub_credentials_under_docker_keys(tmp_path):
    path = auth_file(tmp_path, {"auths": {"https://index.docker.io/v1/":
                                          {"auth": secret("hub", "4")}}})
    assert credentials("docker.io", "library/cirros", path) == ("hub", "4")


EMPTY = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:" + "4" * 64,
         "size": 2}


@pytest.mark.parametrize("manifest, servable", [
    ({"config": EMPTY, "layers": [{"mediaType": "a/b", "digest": "sha256:" + "1" * 64,
                                   "size": 3}]}, True),
    ({"config": EMPTY, "layers": [{"mediaType": "a/b", "digest": "sha256:1", "size": 3}]},
     False),  # not a sha256 digest: never a path, nor a URL
    ({"config": EMPTY, "layers": [{"mediaType": "a/b+gzip", "digest": "sha256:1",
                                   "size": 3}]}, False),
    ({"config": EMPTY, "layers": [{"digest": "sha256:1"}]}, False),
    ({"config": EMPTY, "layers": ["sha256:1"]}, False),
    ({"config": "not a descriptor", "layers": []}, False),
    ({"manifests": [{"artifactType": "x"}]}, False),
    ([1, 2], False),
    ({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"}, "layers": []},
     False),
])
def test_what_can_be_read_as_it_is_read(manifest, servable):
    assert lazily_servable(manifest, "img") is servable


@pytest.mark.parametrize("media_type, compressed", [
    ("application/vnd.oci.image.layer.v1.tar", False),
    ("application/vnd.kubevirt.disk.qcow2", False),
    ("application/vnd.oci.image.layer.v1.tar+gzip", True),
    ("application/vnd.oci.image.layer.v1.tar+zstd", True),
    ("application/vnd.kubevirt.disk.raw+gzip", True),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", True),
])
def test_compressed_media_types(media_type, compressed):
    assert is_compressed(media_type) is compressed


def test_an_http_proxy_in_the_environment_cannot_be_honoured(tmp_path, monkeypatch):
    conf = tmp_path / "registries.conf"
    conf.write_text("")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    settings = Settings(name="x", authfile=auth_file(tmp_path, {"auths": {}}))
    with pytest.raises(Unsupported, match="the environment names an HTTP proxy"):
        Registry("quay.io", "org/disk", "quay.io/org/disk:1", settings)
    assert Registry("127.0.0.1:5000", "a/b", "127.0.0.1:5000/a/b:1", settings).endpoint(0) \
        .scheme == "https"


def test_without_authfile_podmans_own_auth_files_are_read_in_its_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    docker = tmp_path / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"quay.io": {"auth": secret("docker", "1")}}}))
    assert credentials("quay.io", "org/disk") == ("docker", "1")
    podman = tmp_path / "run" / "containers" / "auth.json"
    podman.parent.mkdir(parents=True)
    podman.write_text(json.dumps({"auths": {"quay.io": {"auth": secret("podman", "2")}}}))
    assert credentials("quay.io", "org/disk") == ("podman", "2")
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"auths": {"quay.io": {"auth": secret("chosen", "3")}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(chosen))
    assert credentials("quay.io", "org/disk") == ("chosen", "3")


# ------------------------------------------------ the sources, in order

class FakeEndpoint:
    """A source's endpoint that answers from ANSWERS (name -> bytes, or an
    exception to raise) and records what it was asked."""

    def __init__(self, source, answers, asked):
        self.source, self.answers, self.asked = source, answers, asked

    def answer(self, what):
        self.asked.append((self.source.host, what))
        found = self.answers.get((self.source.host, what), self.answers.get(self.source.host))
        if isinstance(found, Exception):
            raise found
        return found

    def manifest(self, reference):
        return self.answer(reference), "t", "d"

    def blob_range(self, digest, start, end):
        return self.answer("blob")


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """make(answers): a Registry of quay.io/org/disk:1 whose sources are
    mirror.one, mirror.two (registries.conf) and quay.io, answering as
    ANSWERS says; and the list of what each was asked."""
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nlocation = "quay.io/org"\n'
                    '[[registry.mirror]]\nlocation = "mirror.one/q"\n'
                    '[[registry.mirror]]\nlocation = "mirror.two/q"\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    monkeypatch.setenv("HOME", str(tmp_path))
    asked = []

    def make(answers):
        registry = Registry("quay.io", "org/disk", "quay.io/org/disk:1",
                            Settings(name="quay.io/org/disk:1"), "1")
        monkeypatch.setattr(registry, "endpoint", lambda index: FakeEndpoint(
            registry.sources[index], answers, asked))
        return registry
    return make, asked


def refused(host):
    return RegistryError(f"quay.io/org/disk:1: manifest 1: {host}: connection refused",
                         transient=True)


def test_the_manifest_comes_from_the_first_source_that_answers(sources):
    make, asked = sources
    registry = make({"mirror.one": refused("mirror.one"), "mirror.two": b"{}"})
    assert registry.manifest("1")[0] == b"{}"
    assert asked == [("mirror.one", "1"), ("mirror.two", "1")]
    assert registry.sources[registry.preferred].host == "mirror.two"


def test_a_blob_continues_from_the_next_source_and_says_so(sources, caplog):
    make, asked = sources
    registry = make({"mirror.one": b"{}", ("mirror.one", "blob"): refused("mirror.one"),
                     ("mirror.two", "blob"): refused("mirror.two"), "quay.io": b"bytes"})
    registry.manifest("1")
    caplog.set_level("DEBUG", logger="cdipy")
    assert registry.blob_range("sha256:" + "1" * 64, 0, 5) == b"bytes"
    assert "continuing from quay.io/org/disk:1: every byte is checked" in caplog.text
    asked.clear()
    registry.blob_range("sha256:" + "1" * 64, 5, 10)
    assert asked == [("quay.io", "blob")], "the source that answered is tried first"


def test_when_every_source_fails_the_error_names_each(sources):
    make, _ = sources
    registry = make({host: refused(host) for host in ("mirror.one", "mirror.two")}
                    | {"quay.io": RegistryError("quay.io/org/disk:1: manifest 1: quay.io "
                                                "answered HTTP 404 not found")})
    with pytest.raises(NoSource) as error:
        registry.manifest("1")
    assert str(error.value) == (
        "quay.io/org/disk:1: manifest 1: every source failed: "
        "[mirror.one/q/disk:1: mirror.one: connection refused]; "
        "[mirror.two/q/disk:1: mirror.two: connection refused]; "
        "[quay.io/org/disk:1: quay.io answered HTTP 404 not found]")
    assert error.value.transient


def test_when_every_source_answers_404_so_does_the_error(sources):
    make, _ = sources
    registry = make({host: RegistryError(f"x: {host} answered HTTP 404 not found", status=404)
                     for host in ("mirror.one", "mirror.two", "quay.io")})
    with pytest.raises(NoSource) as error:
        registry.manifest("sha256-" + "0" * 64 + ".sig")
    assert error.value.status == 404


def test_a_blocked_registry_is_refused_without_a_request(tmp_path, monkeypatch):
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nlocation = "bad.example"\nblocked = true\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    monkeypatch.setenv("HOME", str(tmp_path))
    registry = Registry("bad.example", "x", "bad.example/x:1", Settings(name="x"), "1")
    with pytest.raises(NoSource) as error:
        registry.manifest("1")
    assert str(error.value) == (f"bad.example/x:1: manifest 1: registry bad.example is blocked "
                                f"in {conf} or {tmp_path}/.config/containers/registries.conf.d")
    assert registry.endpoints == {}


def test_a_mirror_never_receives_the_primarys_credentials(sources, tmp_path):
    make, _ = sources
    path = auth_file(tmp_path, {"auths": {"quay.io": {"auth": secret("primary", "1")},
                                          "mirror.two": {"auth": secret("two", "2")}}})
    settings = Settings(name="quay.io/org/disk:1", authfile=path)
    registry = Registry("quay.io", "org/disk", settings.name, settings, "1")
    assert [registry.endpoint(index).credentials for index in range(3)] == [
        None, ("two", "2"), ("primary", "1")]


# ------------------------------------------------------- the range probe

class WholeBlob:
    """A source's whole answer to a range, which must be closed unread."""
    closed = False

    def __iter__(self):
        raise AssertionError("the probe read its whole answer")

    def close(self):
        self.closed = True


class Probed:
    """A registry answering every range with ANSWER (or raising it)."""
    image_name = "quay.io/org/disk:1"

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def blob_range_or_whole(self, digest, start, end, piece):
        self.asked.append((digest, start, end))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Layout:
    def __init__(self, directory):
        self.directory = directory

    def blob_path(self, digest):
        return os.path.join(self.directory, digest.replace(":", "-"))


HELD, LACKED = "sha256:" + "1" * 64, "sha256:" + "2" * 64
TWO_BLOBS = {"layers": [{"digest": HELD, "size": 10}, {"digest": LACKED, "size": 20}]}


def test_the_probe_asks_for_the_last_byte_of_the_first_blob_the_cache_lacks(tmp_path):
    (tmp_path / HELD.replace(":", "-")).write_bytes(bytes(10))
    registry = Probed(b"x")
    probe_ranges(registry, TWO_BLOBS, Layout(tmp_path))
    assert registry.asked == [(LACKED, 19, 20)]


def test_a_whole_answer_to_the_probe_is_closed_unread_and_the_blob_read_as_it_is_read(
        tmp_path, caplog):
    # A cold pull-through cache, or a registry that ignores Range: the
    # reads keep such answers; the probe's own would be a second download.
    answer = WholeBlob()
    caplog.set_level("DEBUG", logger="cdipy")
    probe_ranges(Probed(answer), TWO_BLOBS, Layout(tmp_path))
    assert answer.closed
    assert "answers a range with the whole blob: each read keeps such an answer" in caplog.text


def test_a_refusal_of_the_probe_is_raised_and_a_transient_failure_left_to_the_reads(tmp_path):
    refusal = RegistryError("quay.io answered HTTP 403 access denied", status=403)
    with pytest.raises(RegistryError, match="403 access denied"):
        probe_ranges(Probed(refusal), TWO_BLOBS, Layout(tmp_path))
    probe_ranges(Probed(refused("quay.io")), TWO_BLOBS, Layout(tmp_path))
