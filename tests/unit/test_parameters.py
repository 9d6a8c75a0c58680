"""The key=value parameters: each parsed as it arrives, every error naming
its key; then the checks that need them all; then what podman is given."""

import pytest

from cdipy.errors import CdiError
from cdipy.parameters import Settings, local_reference, registry_of, split_transport

EXAMPLE = "quay.io/kubevirt/fedora-cloud-container-disk-demo"


def set_error(key, value):
    """The message of the CdiError that Settings.set(KEY, VALUE) raises."""
    with pytest.raises(CdiError) as raised:
        Settings().set(key, value)
    return str(raised.value)


def settings_with(**values):
    settings = Settings()
    for key, value in values.items():
        settings.set(key.replace("_", "-"), value)
    return settings


def complete_error(settings):
    with pytest.raises(CdiError) as raised:
        settings.check_complete()
    return str(raised.value)


# --------------------------------------------------------------------- name

def test_name_keeps_the_image_as_given():
    assert settings_with(name="docker://127.0.0.1:5000/disk:v1").name == (
        "docker://127.0.0.1:5000/disk:v1")


def test_name_empty_says_what_is_expected():
    assert set_error("name", "") == f"name= is empty: expected an image such as {EXAMPLE}"


def test_name_starting_with_dash_is_refused():
    assert set_error("name", "--rm") == "name='--rm': an image name cannot start with '-'"


def test_name_with_a_space_is_refused():
    assert set_error("name", "quay.io/a b") == (
        "name='quay.io/a b': an image name cannot contain spaces or control characters")


def test_name_with_a_control_character_is_refused():
    assert set_error("name", "quay.io/a\x1bb") == (
        "name='quay.io/a\\x1bb': an image name cannot contain spaces or control characters")


# -------------------------------------------------------------------- layer

@pytest.mark.parametrize(("value", "parsed"), [("0", 0), ("2", 2), ("-1", -1), ("auto", "auto")])
def test_layer_accepts_an_index_a_negative_index_or_auto(value, parsed):
    assert settings_with(layer=value).layer == parsed


def test_layer_that_is_not_an_integer_is_refused():
    assert set_error("layer", "top") == (
        "layer='top': expected an integer (0 = base layer, -1 = top layer), auto or disk")


def test_layer_with_a_plus_sign_is_refused():
    assert set_error("layer", "+1") == (
        "layer='+1': expected an integer (0 = base layer, -1 = top layer), auto or disk")


def test_layer_with_too_many_digits_is_refused_and_shortened():
    assert set_error("layer", "1" * 21) == (
        f"layer={'1' * 20}...: too many digits for a layer number")


def test_layer_of_twenty_digits_is_still_a_number():
    assert settings_with(layer="9" * 20).layer == int("9" * 20)


def test_layer_minus_zero_is_ambiguous():
    assert set_error("layer", "-0") == (
        "layer='-0' is ambiguous: use 0 for the base layer or -1 for the top layer")


# --------------------------------------------------------------------- pull

@pytest.mark.parametrize("policy", ["missing", "always", "never"])
def test_pull_accepts_each_policy(policy):
    assert settings_with(pull=policy).pull == policy


def test_pull_unknown_policy_lists_the_policies():
    assert set_error("pull", "sometimes") == (
        "pull='sometimes': expected one of missing, always, never")


# ------------------------------------------------------------ booleans

@pytest.mark.parametrize(("value", "parsed"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("No", False), ("off", False)])
def test_tls_verify_accepts_the_usual_words(value, parsed):
    assert settings_with(tls_verify=value).tls_verify is parsed


def test_tls_verify_other_words_are_refused():
    assert set_error("tls-verify", "maybe") == "tls-verify='maybe': expected true or false"


def test_copy_accepts_a_boolean():
    assert settings_with(copy="on").copy is True


def test_copy_other_words_are_refused():
    assert set_error("copy", "2") == "copy='2': expected true or false"


@pytest.mark.parametrize(("value", "parsed"), [
    ("before", "before"), ("true", "true"), ("yes", "true"), ("0", "false"), ("off", "false")])
def test_verify_accepts_before_or_a_boolean(value, parsed):
    assert settings_with(verify=value).verify == parsed


def test_verify_other_words_are_refused():
    assert set_error("verify", "after") == "verify='after': expected true, before or false"


# -------------------------------------------------------------------- paths

def test_authfile_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings_with(authfile="auth.json").authfile == str(tmp_path / "auth.json")


def test_cert_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings_with(cert_dir="certs").cert_dir == str(tmp_path / "certs")


@pytest.mark.parametrize("key", ["authfile", "cert-dir"])
def test_empty_path_is_refused(key):
    assert set_error(key, "") == f"{key}= is empty: expected a path"


# ----------------------------------------------------------------- platform

@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"])
def test_platform_accepts_os_arch_and_variant(platform):
    assert settings_with(platform=platform).platform == platform


@pytest.mark.parametrize("platform", ["linux", "Linux/amd64", "linux/amd64/v8/x", "linux/"])
def test_platform_not_os_arch_is_refused(platform):
    assert set_error("platform", platform) == (
        f"platform={platform!r}: expected OS/ARCH[/VARIANT], for example linux/arm64/v8")


# -------------------------------------------------------------- unknown keys

def test_unknown_key_lists_the_known_ones():
    assert set_error("image", EXAMPLE) == (
        "unknown parameter 'image': this plugin takes name=, layer=, pull=, tls-verify=, "
        "authfile=, cert-dir=, platform=, verify=, copy=, cache=, pull-into=, "
        "signature-policy=; see nbdkit-cdipy-plugin(1)")


def test_key_spelled_as_its_attribute_is_unknown():
    assert set_error("tls_verify", "true").startswith("unknown parameter 'tls_verify': ")


# ---------------------------------------------------------- check_complete

def test_check_complete_without_name_says_how_to_pass_it():
    assert complete_error(Settings()) == (
        "you must supply name=IMAGE after the script name, for example: "
        f"nbdkit python cdi.py name={EXAMPLE}; see nbdkit-cdipy-plugin(1)")


def test_check_complete_with_a_missing_authfile_names_it(tmp_path):
    settings = settings_with(name=EXAMPLE, authfile=str(tmp_path / "auth.json"))
    assert complete_error(settings) == f"authfile='{tmp_path}/auth.json': no such file"


def test_check_complete_with_a_missing_cert_dir_names_it(tmp_path):
    settings = settings_with(name=EXAMPLE, cert_dir=str(tmp_path / "certs"))
    assert complete_error(settings) == f"cert-dir='{tmp_path}/certs': no such directory"


def test_check_complete_accepts_an_existing_authfile_and_cert_dir(tmp_path):
    (tmp_path / "auth.json").write_text("{}")
    settings = settings_with(name=EXAMPLE, authfile=str(tmp_path / "auth.json"),
                             cert_dir=str(tmp_path))
    settings.check_complete()
    assert settings.registry_options() == [f"--authfile={tmp_path}/auth.json",
                                           f"--cert-dir={tmp_path}"]


def test_check_complete_refuses_pull_never_with_a_file_transport():
    settings = settings_with(name="oci-archive:/srv/disk.tar", pull="never")
    assert complete_error(settings) == (
        "pull=never cannot be used with oci-archive:/srv/disk.tar: "
        "that transport is always read anew")


@pytest.mark.parametrize("name", [EXAMPLE, f"docker://{EXAMPLE}", f"containers-storage:{EXAMPLE}"])
def test_check_complete_allows_pull_never_with_names_in_local_storage(name):
    settings = settings_with(name=name, pull="never")
    settings.check_complete()
    assert settings.pull == "never"


# -------------------------------------------------------- registry_options

def test_registry_options_are_empty_by_default():
    assert Settings(name=EXAMPLE).registry_options() == []


def test_registry_options_give_one_argv_element_per_option():
    settings = settings_with(name=EXAMPLE, tls_verify="no", authfile="/etc/my auth.json",
                             cert_dir="/etc/certs", platform="linux/arm64")
    assert settings.registry_options() == [
        "--tls-verify=false", "--authfile=/etc/my auth.json", "--cert-dir=/etc/certs",
        "--platform=linux/arm64"]


def test_registry_options_pass_tls_verify_true_explicitly():
    assert settings_with(tls_verify="yes").registry_options() == ["--tls-verify=true"]


# ----------------------------------------------------------- image names

@pytest.mark.parametrize(("name", "expected"), [
    ("quay.io/org/disk:v1", ("", "quay.io/org/disk:v1")),
    ("docker://quay.io/org/disk", ("docker", "//quay.io/org/disk")),
    ("containers-storage:localhost/disk", ("containers-storage", "localhost/disk")),
    ("oci-archive:/srv/disk.tar", ("oci-archive", "/srv/disk.tar")),
    ("127.0.0.1:5000/disk", ("", "127.0.0.1:5000/disk")),
    ("localhost:5000/disk:latest", ("", "localhost:5000/disk:latest")),
])
def test_split_transport(name, expected):
    assert split_transport(name) == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("quay.io/org/disk", "quay.io/org/disk"),
    ("docker://quay.io/org/disk", "quay.io/org/disk"),
    ("containers-storage:localhost/disk", "localhost/disk"),
    ("127.0.0.1:5000/disk", "127.0.0.1:5000/disk"),
    ("oci-archive:/srv/disk.tar", None),
    ("docker-archive:/srv/disk.tar", None),
    ("dir:/srv/disk", None),
])
def test_local_reference(name, expected):
    assert local_reference(name) == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("quay.io/org/disk", "quay.io"),
    ("docker://quay.io/org/disk", "quay.io"),
    ("containers-storage:registry.example/disk", "registry.example"),
    ("127.0.0.1:5000/disk", "127.0.0.1:5000"),
    ("docker://127.0.0.1:5000/disk", "127.0.0.1:5000"),
    ("localhost/disk", "localhost"),
    ("fedora", "the default search registries"),
    ("library/fedora", "the default search registries"),
])
def test_registry_of(name, expected):
    assert registry_of(name) == expected
