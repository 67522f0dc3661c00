"""Image reference parsing: docker's normalisation and skopeo's transports."""

import pytest

from builder.errors import BadInput
from builder.reference import parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, registry, repo, tag, digest",
    [
        ("nginx", "docker.io", "library/nginx", "latest", None),
        ("nginx:1.25", "docker.io", "library/nginx", "1.25", None),
        ("docker://nginx", "docker.io", "library/nginx", "latest", None),
        ("team/app", "docker.io", "team/app", "latest", None),
        ("index.docker.io/library/nginx", "docker.io", "library/nginx", "latest", None),
        ("localhost:5000/team/app:v1", "localhost:5000", "team/app", "v1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("ghcr.io/org/sub/app:1.0-rc.1", "ghcr.io", "org/sub/app", "1.0-rc.1", None),
        (f"nginx@{D}", "docker.io", "library/nginx", None, D),
        (f"127.0.0.1:5000/x:t@{D}", "127.0.0.1:5000", "x", "t", D),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ],
)
def test_docker_normalisation(text, registry, repo, tag, digest):
    ref = parse(text)
    assert (ref.transport, ref.registry, ref.repository, ref.tag, ref.digest) == (
        "docker",
        registry,
        repo,
        tag,
        digest,
    )


def test_str_round_trips():
    assert str(parse("nginx")) == "docker://docker.io/library/nginx:latest"
    assert str(parse("oci:/tmp/l:tag")) == "oci:/tmp/l:tag"
    assert parse(str(parse("localhost:5000/a/b:c"))) == parse("localhost:5000/a/b:c")


@pytest.mark.parametrize(
    "text, transport, path, name",
    [
        ("oci:fixtures/oci:nginx", "oci", "fixtures/oci", "nginx"),
        ("oci:/abs/dir", "oci", "/abs/dir", None),
        ("oci-archive:img.tar:v1", "oci-archive", "img.tar", "v1"),
        ("docker-archive:save.tar", "docker-archive", "save.tar", None),
        ("docker-archive:save.tar:app:dev", "docker-archive", "save.tar", "app:dev"),
    ],
)
def test_file_transports(text, transport, path, name):
    ref = parse(text)
    assert (ref.transport, ref.path, ref.name) == (transport, path, name)


def test_daemon_transport():
    ref = parse("docker-daemon:myapp:dev")
    assert (ref.transport, ref.repository, ref.tag) == ("docker-daemon", "library/myapp", "dev")


@pytest.mark.parametrize(
    "text",
    ["", " nginx", "Nginx", "nginx:bad tag", "nginx@sha256:123", "oci:", "ftp://x/y", "a//b", "nginx:", "-x"],
)
def test_bad_references(text):
    with pytest.raises(BadInput) as e:
        parse(text)
    assert "invalid image reference" in str(e.value)


def test_short_name():
    assert parse("localhost:5000/team/app:v1").short_name == "app"
    assert parse("oci:fixtures/oci:nginx").short_name == "nginx"
    assert parse("docker-archive:/tmp/save.tar").short_name == "save"
