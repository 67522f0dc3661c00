"""The compatibility corpus (issue 13): real applications survive `--minimize auto` and serve under QEMU.

Each app of tests.fixtures.corpus.APPS is checked twice with its real client: first as the image is,
under `docker run` (the test dockerd, --network none; the check runs in the container's network
namespace through nsenter), so a broken fixture is never blamed on xbuild; then built with the real CLI
(`xbuild IMAGE --minimize auto`, once per app per session) and booted with `xbuild run -p`.
All slow: the layouts are built once per script version under $XBUILD_FIXTURES from one cached
debootstrap (tests/fixtures/debian-base.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.corpus import APPS, App, Built, build, layout_ref, serve
from tests.fixtures.dockerd import Dockerd

pytestmark = [pytest.mark.slow, pytest.mark.corpus]  # `make test-corpus`, not `make test` (README: cold cost)
REPO = Path(__file__).resolve().parent.parent
NAMES = list(APPS)


def _root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the corpus fixtures need root (debootstrap, umoci, chroot)")


@pytest.fixture(scope="session", params=NAMES)
def corpus_app(request: pytest.FixtureRequest) -> tuple[App, str]:
    """(app, `oci:` reference), the layout built on first use."""
    _root_tools()
    app = APPS[request.param]
    return app, layout_ref(app)


_built: dict[str, Built] = {}


def built_auto(app: App, ref: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`app` built once per session with the real CLI and `--minimize auto` (the default kernel)."""
    if app.name not in _built:
        _built[app.name] = build(ref, tmp_path_factory.mktemp(f"corpus-{app.name}") / "artifact")
    return _built[app.name]


@pytest.fixture
def docker_host(dockerd: Dockerd, monkeypatch: pytest.MonkeyPatch) -> Dockerd:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    return dockerd


def test_docker_run(corpus_app: tuple[App, str], docker_host: Dockerd, tmp_path: Path) -> None:
    """The fixture itself works: `docker run` of the unmodified image answers its client."""
    app, ref = corpus_app
    image = f"corpus-{app.name}:latest"
    archive = tmp_path / "image.tar"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "-q", ref, f"docker-archive:{archive}:{image}"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    docker_host.docker("load", "-q", "-i", str(archive), timeout=600)
    archive.unlink()
    name = f"corpus-{app.name}-{uuid.uuid4().hex[:8]}"
    docker_host.docker("run", "-d", "--network", "none", "--name", name, image)
    try:
        pid = docker_host.docker("inspect", "-f", "{{.State.Pid}}", name).strip()
        r = subprocess.run(
            [
                "nsenter",
                "-t",
                pid,
                "-n",
                sys.executable,
                "-m",
                "tests.fixtures.corpus",
                app.name,
                str(app.port),
                "120",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        logs = subprocess.run(
            ["docker", "logs", name],
            capture_output=True,
            text=True,
            env={**os.environ, "DOCKER_HOST": docker_host.host},
        ).stderr[-3000:]
        assert r.returncode == 0, f"{r.stderr}\n--- container log:\n{logs}"
    finally:
        docker_host.docker("rm", "-f", name)


@pytest.mark.parametrize("name", NAMES)
def test_auto_serves_under_qemu(
    name: str, tmp_path_factory: pytest.TempPathFactory, default_kernel_path: Path
) -> None:
    """`--minimize auto`, booted under QEMU, answers the app's real client."""
    _root_tools()
    app = APPS[name]
    built = built_auto(app, layout_ref(app), tmp_path_factory)
    assert built.returncode == 0, built.stderr
    served = serve(app, built.artifact)
    assert served.ok, f"{served.answer}\n--- console:\n{served.console[-6000:]}"
