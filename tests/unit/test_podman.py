"""What podman's stderr means to the user, and which of its lines to quote."""

import subprocess

import pytest

from cdipy.podman import DIAGNOSES, describe_status, diagnose, summary

TMPDIR = "/var/tmp/cdi"
SHORT_NAME_ADVICE = ("short name with no search registries configured: use a fully "
                     "qualified name such as quay.io/ORG/IMAGE")
DIGEST_ADVICE = ("the layer in local storage does not match its digest: remove the image "
                 "(podman rmi) and pull it again")
CORRUPT_ADVICE = ("podman's copy of the layer in local storage is corrupt: remove the image "
                  "(podman rmi) and pull it again")

# (podman's stderr, the registry the name refers to, what the user is told),
# at least one per row of DIAGNOSES, in its order.
CASES = [
    ('Error: copying system image from manifest list: writing blob: adding layer with blob '
     '"sha256:1f": processing tar file(write /usr/lib/disk.img: no space left on device): '
     "exit status 1",
     "quay.io", f"no space left on device in TMPDIR={TMPDIR}"),
    ('Error: short-name "fedora" did not resolve to an alias and no unqualified-search '
     'registries are defined in "/etc/containers/registries.conf"',
     "the default search registries", SHORT_NAME_ADVICE),
    ("Error: initializing source docker://127.0.0.1:5001/private:latest: reading manifest "
     "latest in 127.0.0.1:5001/private: unauthorized: authentication required",
     "127.0.0.1:5001",
     "authentication required by 127.0.0.1:5001: run podman login or pass authfile=PATH"),
    ("Error: initializing source docker://127.0.0.1:5000/missing:latest: reading manifest "
     "latest in 127.0.0.1:5000/missing: manifest unknown",
     "127.0.0.1:5000", "image not found"),
    ("Error: quay.io/org/disk:v9: image not known", "quay.io", "image not found"),
    ('Error: file integrity checksum failed for "disk/disk.img"', "quay.io", DIGEST_ADVICE),
    ("Error: copying system image: writing blob: happened during read: Digest did not match, "
     "expected sha256:1f, got sha256:2e", "quay.io", DIGEST_ADVICE),
    ("Error: copying image 1/1 from local storage: reading blob sha256:1f: "
     "flate: corrupt input before offset 4096",
     "quay.io", CORRUPT_ADVICE),
    ("Error: payload does not match any of the supported image formats: "
     "open /srv/disk.tar: no such file or directory",
     "the default search registries", "file not found"),
    # skopeo 1.9 and 1.18, a missing oci-archive.
    ('time="2026-12-01T08:57:33Z" level=fatal msg="initializing source oci-archive:/x.tar:: '
     'creating temp directory: open /x.tar: no such file or directory"',
     "the default search registries", "file not found"),
    ('time="2026-12-01T08:57:33Z" level=fatal msg="initializing source oci-archive:/x.tar:: '
     'creating temp directory: archive file not found: \\"/x.tar\\""',
     "the default search registries", "file not found"),
    ("Error: copying system image: reading blob sha256:1f: fetching blob: "
     "happened during read: unexpected EOF",
     "127.0.0.1:5000", "the connection to 127.0.0.1:5000 was cut during the download"),
    # podman 5 retries, and says so: what was refused is the retry.
    ('Error: writing blob: storing blob to file "/var/tmp/cdi-py-81-rf/container_images_'
     'storage2385965276/1": happened during read: unexpected EOF (while reconnecting: Get '
     '"http://127.0.0.1:5000/v2/x/blobs/sha256:81": dial tcp 127.0.0.1:5000: connect: '
     "connection refused)",
     "127.0.0.1:5000", "the connection to 127.0.0.1:5000 was cut during the download"),
    ("Error: reading blob sha256:1f: read tcp 127.0.0.1:40000->127.0.0.1:5000: "
     "read: connection reset by peer",
     "127.0.0.1:5000", "the connection to 127.0.0.1:5000 was cut during the download"),
    ('Error: initializing source docker://127.0.0.1:1/x: pinging container registry '
     '127.0.0.1:1: Get "https://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: '
     "connection refused",
     "quay.io", "registry 127.0.0.1:1 unreachable"),
    ("Error: initializing source docker://nosuch.example/x:latest: pinging container registry "
     'nosuch.example: Get "https://nosuch.example/v2/": dial tcp: lookup nosuch.example '
     "on 127.0.0.53:53: no such host",
     "nosuch.example", "registry nosuch.example unreachable"),
    ("Error: initializing source docker://127.0.0.1:5000/x:latest: pinging container "
     'registry 127.0.0.1:5000: Get "https://127.0.0.1:5000/v2/": http: server gave HTTP '
     "response to HTTPS client",
     "127.0.0.1:5000", "registry 127.0.0.1:5000 speaks plain HTTP, not HTTPS: pass "
     "tls-verify=false if you trust it"),
    ('Error: reading manifest latest in 10.0.0.1/x: Get "https://10.0.0.1/v2/x/manifests/'
     'latest": dial tcp 10.0.0.1:443: i/o timeout',
     "10.0.0.1", "registry 10.0.0.1 unreachable"),
]


@pytest.mark.parametrize(("stderr", "registry", "meaning"), CASES)
def test_diagnose_a_realistic_podman_error(stderr, registry, meaning):
    assert diagnose(stderr, registry, TMPDIR) == meaning


def test_every_diagnosis_has_a_realistic_case():
    told = {meaning for _, _, meaning in CASES}
    templates = {template for _, template in DIAGNOSES}
    covered = {template for template in templates
               if any(meaning.startswith(template.split("{")[0]) for meaning in told)}
    assert covered == templates


def test_diagnose_prefers_the_registry_podman_was_pinging():
    stderr = ('Error: initializing source docker://quay.io/x: pinging container registry '
              'mirror.example:8443: Get "https://mirror.example:8443/v2/": '
              "dial tcp: connect: connection refused")
    assert diagnose(stderr, "quay.io", TMPDIR) == "registry mirror.example:8443 unreachable"


def test_diagnose_names_an_ipv6_registry_podman_was_pinging_whole():
    # podman accepts [::1]:5000/disk, and registry_of gives "[::1]:5000".
    stderr = ("Error: initializing source docker://[::1]:5000/disk:latest: pinging container "
              'registry [::1]:5000: Get "https://[::1]:5000/v2/": dial tcp [::1]:5000: '
              "connect: connection refused")
    assert diagnose(stderr, "[::1]:5000", TMPDIR) == "registry [::1]:5000 unreachable"


def test_diagnose_ignores_case():
    assert diagnose("Error: writing blob: NO SPACE LEFT ON DEVICE", "quay.io", "/tmp") == (
        "no space left on device in TMPDIR=/tmp")


CGROUPS_V1_WARNING = (
    'time="2026-12-01T08:57:44Z" level=warning msg="Using cgroups-v1 which is deprecated in '
    "favor of cgroups-v2 with Podman v5 and will be removed in a future version. Set "
    'environment variable `PODMAN_IGNORE_CGROUPSV1_WARNING` to hide this warning."')


def test_diagnose_ignores_warnings():
    stderr = ('time="2026-12-01T08:57:44Z" level=warning msg="Failed to decode the keys: '
              'open /etc/containers/storage.conf: no such file or directory"\n'
              "Error: something nobody expected\n")
    assert diagnose(stderr, "quay.io", TMPDIR) == "podman failed"


def test_diagnose_of_unknown_text_is_podman_failed():
    assert diagnose("Error: something nobody expected", "quay.io", TMPDIR) == "podman failed"


def test_diagnose_of_no_text_is_podman_failed():
    assert diagnose("", "quay.io", TMPDIR) == "podman failed"


# ------------------------------------------------------------------ summary

def test_summary_quotes_the_last_error_line():
    stderr = ('time="2024-01-01T00:00:00Z" level=warning msg="falling back"\n'
              "Error: first attempt failed\n"
              "Trying to pull quay.io/x...\n"
              "  Error: the final word  \n"
              "Storing signatures\n")
    assert summary(stderr) == "Error: the final word"


def test_summary_quotes_the_error_before_podman_5s_cgroups_v1_warning():
    stderr = f"{CGROUPS_V1_WARNING}\nError: nonexist: image not known\n{CGROUPS_V1_WARNING}\n"
    assert summary(stderr) == "Error: nonexist: image not known"


def test_summary_without_an_error_line_leaves_out_warnings():
    # podman 5 killed by a signal: no Error line, and a warning at each end.
    stderr = (f"{CGROUPS_V1_WARNING}\nGetting image source signatures\n"
              "Copying blob 1f\nWARN[0003] Failed, retrying in 1s ... (1/3)\n"
              f"{CGROUPS_V1_WARNING}\n")
    assert summary(stderr) == "Getting image source signatures / Copying blob 1f"


def test_summary_of_warnings_alone_says_there_is_no_message():
    assert summary(CGROUPS_V1_WARNING + "\n") == "(no message)"


def test_summary_without_an_error_line_joins_the_last_three_lines():
    stderr = "one\ntwo\n\n  three\nfour\n   \n"
    assert summary(stderr) == "two / three / four"


def test_summary_of_fewer_than_three_lines_joins_them_all():
    assert summary("panic: runtime error\ngoroutine 1 [running]:\n") == (
        "panic: runtime error / goroutine 1 [running]:")


def test_summary_of_nothing_says_so():
    assert summary("") == "(no message)"


def test_summary_of_blank_lines_says_so():
    assert summary("\n   \n\t\n") == "(no message)"


# ------------------------------------------------------------ exit status

def test_describe_status_gives_the_exit_status():
    assert describe_status(subprocess.CompletedProcess(["podman"], 125)) == (
        "podman exit status 125")


def test_describe_status_names_the_signal_that_killed_it():
    assert describe_status(subprocess.CompletedProcess(["podman"], -9)) == (
        "podman killed by signal 9")
