"""The image's HEALTHCHECK: parsed as `docker create` checks it, run by the real init under QEMU as moby's
daemon/health.go runs it, reported by `xbuild run`, and checked by `xbuild IMAGE`'s verify-by-default.

Reference semantics (moby daemon/health.go): the state starts "starting"; the first probe runs one
interval after the program started (StartInterval while starting inside StartPeriod); exit 0 → healthy
(streak reset); anything else (a timeout kills the probe) is a failure, not counted while starting inside
StartPeriod; Retries consecutive counted failures → unhealthy. CMD-SHELL runs `/bin/sh -c`. Boot tests use
busybox images and millisecond timings so that each boot stays a few seconds of TCG.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from builder.errors import SourceError
from builder.guest import GuestConfig, Health, health_probe
from builder.image import Healthcheck, ImageConfig
from tests.fixtures import images as fx
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.test_init import artifact_from, boot, cloud_kernel  # noqa: F401  (cloud_kernel: a fixture)

MS = 1_000_000  # ns
slow = pytest.mark.slow
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


def health_lines(console: bytes) -> list[str]:
    return [ln.strip() for ln in console.decode(errors="replace").splitlines() if "xbuild: health: " in ln]


def states(console: bytes) -> list[str]:
    found = (re.search(r"xbuild: health: (healthy|unhealthy)$", ln) for ln in health_lines(console))
    return [m[1] for m in found if m]


def busybox_artifact(tmp: Path, kernel: Path, script: str, health: dict, user: str = "") -> Path:
    config = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": [script], "Healthcheck": health, "User": user}
    img = fx.make_busybox_image(tmp / "layout", "bb", config)
    art, gc = artifact_from(tmp, kernel, img.ref, "bb")
    assert gc.health is not None or health.get("Test") == ["NONE"]
    return art


# ------------------------------------------------------------------------------------------- fast


def test_docker_defaults_and_shell() -> None:
    cfg = ImageConfig(cmd=("x",), healthcheck=Healthcheck(("CMD-SHELL", "curl -f localhost || exit 1")))
    assert health_probe(cfg) == Health(
        ("/bin/sh", "-c", "curl -f localhost || exit 1"), 30000, 30000, 0, 5000, 3
    )
    shell = ImageConfig(
        cmd=("x",),
        shell=("/bin/bash", "-eo", "pipefail", "-c"),
        healthcheck=Healthcheck(("CMD-SHELL", "true"), 1500 * MS, 1 * MS, 2 * MS, 0, 7),
    )
    assert health_probe(shell) == Health(("/bin/bash", "-eo", "pipefail", "-c", "true"), 1500, 1, 2, 5000, 7)
    exec_form = ImageConfig(cmd=("x",), healthcheck=Healthcheck(("CMD", "/bin/probe", "a b"), 1_500_001))
    assert health_probe(exec_form).argv == ("/bin/probe", "a b")  # type: ignore[union-attr]
    assert health_probe(exec_form).interval_ms == 2  # type: ignore[union-attr]  (rounded up)
    assert health_probe(ImageConfig(cmd=("x",), healthcheck=Healthcheck(("NONE",)))) is None
    assert health_probe(ImageConfig(cmd=("x",), healthcheck=Healthcheck())) is None
    assert health_probe(ImageConfig(cmd=("x",))) is None


def test_overrides_merge_like_docker_run() -> None:
    """docker run --health-* replaces only the fields it gives; --no-healthcheck disables."""
    image = Healthcheck(("CMD", "/ok"), 10_000 * MS, 0, 0, 0, 5)

    def probe(override: Healthcheck, base: Healthcheck | None) -> Health | None:
        return health_probe(ImageConfig(cmd=("x",), healthcheck=override.merged(base)))

    assert probe(Healthcheck((), 2000 * MS), image) == Health(("/ok",), 2000, 30000, 0, 5000, 5)
    assert probe(Healthcheck(("NONE",)), image) is None
    assert probe(Healthcheck(("CMD-SHELL", "true")), None) == Health(("/bin/sh", "-c", "true"))


def test_init_config_round_trip() -> None:
    gc = GuestConfig(
        argv=("a",),
        env=(),
        cwd="/",
        uid=0,
        gid=0,
        groups=(0,),
        stop_signal=15,
        hostname="h",
        health=Health(("/bin/sh", "-c", "x y"), 1, 2, 3, 4, 5),
    )
    assert GuestConfig.decode(gc.encode()) == gc
    huge = Health(("p",), (1 << 63) // MS + 1, 1, 0, 1, (1 << 63) - 1)
    encoded = GuestConfig(("a",), (), "/", 0, 0, (), 15, "h", health=huge).encode()
    assert GuestConfig.decode(encoded).health == huge


@pytest.mark.parametrize(
    "health,needle",
    [
        ({"Test": ["CMD"]}, "CMD without a command"),
        ({"Test": ["FOO", "x"]}, "'FOO' is not one of NONE, CMD, CMD-SHELL"),
        ({"Test": ["CMD-SHELL", "true"], "Interval": -1}, "Interval -1 is outside"),
        ({"Test": ["CMD-SHELL", "true"], "Timeout": 1 << 63}, "Timeout 9223372036854775808 is outside"),
        ({"Test": ["CMD-SHELL", "true"], "StartPeriod": 999}, "less than 1ms"),
        ({"Test": ["CMD-SHELL", "true"], "Retries": -3}, "Retries -3 is outside"),
        ({"Test": ["CMD-SHELL", "true"], "Interval": "30s"}, "Healthcheck.Interval must be an integer"),
        ({"Test": ["CMD-SHELL", "true"], "Retries": True}, "Healthcheck.Retries must be an integer"),
        ({"Test": "curl -f localhost"}, "Healthcheck.Test must be a list of strings"),
        ({"Test": ["CMD-SHELL", "x" * (128 << 10) + "x"]}, "a word of 131073 bytes"),
        ("CMD true", "config.Healthcheck must be an object"),
    ],
)
def test_hostile_healthcheck_is_refused(sandbox: Sandbox, health: object, needle: str) -> None:
    """Values docker create refuses (and some it would accept but could never run) are bad input."""
    img = fx.make_busybox_image(sandbox.root / "layout", "bb", {"Healthcheck": health})
    before = sandbox.snapshot()
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), "--kernel", "none")
    assert_refused(r, 2, needle)
    assert sandbox.changes(before) == []


def test_giant_but_runnable_command_and_huge_interval_are_accepted(sandbox: Sandbox) -> None:
    """A 128 KiB probe word (Linux's limit) and an interval of 292 years build; the manifest records them."""
    health = {"Test": ["CMD-SHELL", "x" * (128 << 10)], "Interval": (1 << 63) - 1, "Retries": (1 << 63) - 1}
    img = fx.make_busybox_image(sandbox.root / "layout", "bb", {"Healthcheck": health})
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), "--kernel", "none", "--json")
    assert r.returncode == 0, r.stderr
    h = json.loads(r.stdout)["guest"]["health"]
    assert h["interval_ms"] == 9223372036855 and h["retries"] == (1 << 63) - 1
    assert len(h["argv"][2]) == 128 << 10


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--no-healthcheck", "--health-cmd", "true"], "--no-healthcheck conflicts with --health-cmd"),
        (["--health-interval", "5 s"], "--health-interval '5 s': expected a duration"),
        (["--health-timeout", "-1s"], "--health-timeout '-1s': expected a duration"),
        (["--health-interval", "10us"], "less than 1ms"),
        (["--health-cmd", ""], "--health-cmd: an empty command"),
        (["--no-verify", "--verify-on", "qemu"], "--no-verify conflicts with --verify-on"),
    ],
)
def test_health_flags_refused(sandbox: Sandbox, args: list[str], needle: str) -> None:
    img = fx.make_busybox_image(sandbox.root / "layout", "bb")
    before = sandbox.snapshot()
    assert_refused(sandbox.xbuild(img.ref, "-o", str(sandbox.out), "--kernel", "none", *args), 2, needle)
    assert sandbox.changes(before) == []


def test_health_flags_and_no_verify_without_kernel(sandbox: Sandbox) -> None:
    """--health-* override the image's field by field; with --kernel none verify says it skipped, once."""
    img = fx.make_busybox_image(
        sandbox.root / "layout", "bb", {"Healthcheck": {"Test": ["CMD", "/bin/true"], "Retries": 9}}
    )
    r = sandbox.xbuild(
        img.ref,
        "-o",
        str(sandbox.out),
        "--kernel",
        "none",
        "--health-interval",
        "1m30s",
        "--health-start-period",
        "1.5s",
    )
    assert r.returncode == 0, r.stderr
    assert (
        r.stderr.count(
            "xbuild: verify: skipped, the artifact has no kernel (--kernel none); "
            "it would check the image's HEALTHCHECK"
        )
        == 1
    ), r.stderr
    h = json.loads((sandbox.out / "manifest.json").read_text())["guest"]["health"]
    assert h == {
        "argv": ["/bin/true"],
        "interval_ms": 90000,
        "timeout_ms": 30000,
        "start_period_ms": 1500,
        "start_interval_ms": 5000,
        "retries": 9,
    }
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), "--kernel", "none", "--no-healthcheck")
    assert r.returncode == 0 and "xbuild: verify" not in r.stderr, r.stderr
    assert "health" not in json.loads((sandbox.out / "manifest.json").read_text())["guest"]


@pytest.mark.parametrize(
    "test,kept",
    [
        (
            ["CMD", "/usr/local/bin/healthy", "/srv/probe.conf"],
            {"usr/local/bin/healthy": "healthcheck", "srv/probe.conf": "healthcheck", "srv/data": "script"},
        ),
        (
            ["CMD-SHELL", "healthy --quick || exit 1"],
            {"usr/local/bin/healthy": "script", "srv/data": "script"},
        ),
        (["NONE"], {}),
    ],
)
def test_minimize_keeps_what_the_probe_runs(tmp_path: Path, test: list[str], kept: dict[str, str]) -> None:
    """The probe's program (CMD) or what its shell text runs (CMD-SHELL), and their closure, survive auto."""
    from builder.flatten import flatten
    from builder.minimize import minimize
    from builder.reference import parse
    from builder.source import load

    extra = [
        fx.dir("usr/local/bin/"),
        fx.file("usr/local/bin/healthy", b"#!/bin/sh\ncat /srv/data\n", 0o755),
        fx.dir("srv/"),
        fx.file("srv/data", b"ok\n"),
        fx.file("srv/probe.conf", b"x\n"),
    ]
    config = {"Cmd": ["sleep", "60"], "Healthcheck": {"Test": test}}
    img = fx.make_busybox_image(tmp_path / "layout", "bb", config, extra_layers=[extra])
    image = load(parse(img.ref))
    _, report = minimize(flatten(image).tree, image.config)
    paths = report.to_json()["paths"]
    for path in ("usr/local/bin/healthy", "srv/data", "srv/probe.conf"):
        want = kept.get(path)
        got = paths[f"/{path}"]
        assert (got[0], got[1]) == (("kept", want) if want else ("dropped", "unreferenced")), (path, got)


# ------------------------------------------------------------------------------------- init, booted


@slow
@needs_qemu
def test_healthy_then_unhealthy_with_the_probes_output(tmp_path: Path, cloud_kernel: Path) -> None:
    """Markers only on changes; the unhealthy marker is followed by how the last probe ended and its output;
    the probe runs as the program's user."""
    art = busybox_artifact(
        tmp_path,
        cloud_kernel,
        "touch /tmp/ready; sleep 3; rm /tmp/ready; sleep 4; echo done",
        {"Test": ["CMD-SHELL", "echo uid=$(id -u); test -e /tmp/ready"], "Interval": 300 * MS, "Retries": 2},
        user="nobody",
    )
    r = boot(art)
    assert r.exit_status == 0 and b"done" in r.console, r.console.decode(errors="replace")
    assert states(r.console) == ["healthy", "unhealthy"], health_lines(r.console)
    lines = health_lines(r.console)
    i = lines.index("xbuild: health: unhealthy")
    assert lines[i + 1 :] == ["xbuild: health: probe exit status 1", "xbuild: health: probe: uid=65534"], (
        lines
    )
    assert r.health == "unhealthy"


@slow
@needs_qemu
def test_none_and_a_huge_interval_run_no_probe(tmp_path: Path, cloud_kernel: Path) -> None:
    for name, health in (
        ("none", {"Test": ["NONE"], "Interval": 100 * MS}),
        ("huge", {"Test": ["CMD", "/bin/false"], "Interval": (1 << 63) - 1, "Retries": (1 << 63) - 1}),
    ):
        d = tmp_path / name
        d.mkdir()
        r = boot(busybox_artifact(d, cloud_kernel, "sleep 2; exit 4", health))
        assert r.exit_status == 4 and health_lines(r.console) == [], r.console.decode(errors="replace")
        assert r.health is None


@slow
@needs_qemu
def test_start_period_failures_do_not_count(tmp_path: Path, cloud_kernel: Path) -> None:
    """Always failing, Retries 1, probed every 200 ms: unhealthy only once the 3 s start period is over
    (after the program's mark at 2 s), not at the first failure."""
    art = busybox_artifact(
        tmp_path,
        cloud_kernel,
        "sleep 2; echo mark; sleep 3",
        {
            "Test": ["CMD", "/bin/false"],
            "Interval": 200 * MS,
            "StartInterval": 200 * MS,
            "StartPeriod": 3000 * MS,
            "Retries": 1,
        },
    )
    r = boot(art)
    text = r.console.decode(errors="replace")
    assert states(r.console) == ["unhealthy"], text
    assert text.index("mark") < text.index("xbuild: health: unhealthy"), text


@slow
@needs_qemu
def test_start_interval_finds_healthy_before_the_interval(tmp_path: Path, cloud_kernel: Path) -> None:
    """Interval 1 h, StartInterval 200 ms inside a 1 h start period: healthy within the program's 3 s."""
    art = busybox_artifact(
        tmp_path,
        cloud_kernel,
        "sleep 1; touch /tmp/up; sleep 2; echo end",
        {
            "Test": ["CMD", "test", "-e", "/tmp/up"],
            "Interval": 3600_000 * MS,
            "StartInterval": 200 * MS,
            "StartPeriod": 3600_000 * MS,
        },
    )
    r = boot(art)
    text = r.console.decode(errors="replace")
    assert states(r.console) == ["healthy"], text
    assert text.index("xbuild: health: healthy") < text.index("end"), text


@slow
@needs_qemu
def test_timeout_kills_the_probe_and_its_children(tmp_path: Path, cloud_kernel: Path) -> None:
    """A probe past Timeout is a failure; its whole process group is killed (no `sleep 30` is left)."""
    art = busybox_artifact(
        tmp_path,
        cloud_kernel,
        "sleep 4; ps -o args; echo listed",
        {
            "Test": ["CMD-SHELL", "echo started; sleep 31 & sleep 30"],
            "Interval": 200 * MS,
            "Timeout": 500 * MS,
            "Retries": 1,
        },
    )
    r = boot(art)
    text = r.console.decode(errors="replace")
    assert states(r.console) == ["unhealthy"], text
    assert "xbuild: health: probe timed out after 500ms" in health_lines(r.console), text
    assert "xbuild: health: probe: started" in health_lines(r.console), text
    listing = text[text.index("PID") if "PID" in text else 0 : text.index("listed")]
    assert "sleep 30" not in listing and "sleep 31" not in listing, text


@slow
@needs_qemu
def test_exec_form_probe_that_is_missing(tmp_path: Path, cloud_kernel: Path) -> None:
    """CMD exec form: a missing program is the probe's own output (not an init error marker)."""
    art = busybox_artifact(
        tmp_path,
        cloud_kernel,
        "sleep 2",
        {"Test": ["CMD", "/usr/bin/curl", "-f", "http://localhost/"], "Interval": 200 * MS, "Retries": 1},
    )
    r = boot(art)
    assert states(r.console) == ["unhealthy"], r.console.decode(errors="replace")
    assert "xbuild: health: probe exit status 127" in health_lines(r.console)
    assert "xbuild: health: probe: /usr/bin/curl: No such file or directory" in health_lines(r.console)
    assert r.error is None and r.exit_status == 0


# ----------------------------------------------------------------------- run and verify, real CLI


@slow
@needs_qemu
def test_verify_by_default_names_the_dropped_file(sandbox: Sandbox, default_kernel_path: Path) -> None:
    """The probe reads a file minimize drops (its path is computed, and no word of the script names it or
    its directory, so no analysis can see it): the
    default verify boots the result, the HEALTHCHECK turns unhealthy, the error names the file; exit 1.
    The same image with --minimize none verifies; --no-verify does not boot."""
    img = fx.make_busybox_image(
        sandbox.root / "layout",
        "bb",
        {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["sleep 600"],
            "Healthcheck": {
                "Test": ["CMD-SHELL", 'cat "$(printf /s%sv/ready.txt r)"'],
                "Interval": 1000 * MS,
                "Retries": 2,
            },
        },
        extra_layers=[[fx.dir("srv/"), fx.file("srv/ready.txt", b"ok\n")]],
    )
    kernel = ("--kernel", str(default_kernel_path))
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), *kernel, "-q")
    line = assert_refused(
        r,
        1,
        "verify failed for",
        "HEALTHCHECK unhealthy",
        "dropped by minimize: /srv/ready.txt (unreferenced)",
        "--minimize none",
    )
    assert "keep it with the recipe's [keep] paths" in line
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), *kernel, "--minimize", "none")
    assert r.returncode == 0, r.stderr
    assert "xbuild: verify: passed (HEALTHCHECK healthy)" in r.stderr, r.stderr
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), *kernel, "--no-verify")
    assert r.returncode == 0 and "xbuild: verify" not in r.stderr, r.stderr


@slow
@needs_qemu
def test_run_reports_health(sandbox: Sandbox, default_kernel_path: Path) -> None:
    """`xbuild run` prints the last state and puts it in --json; none without a HEALTHCHECK."""
    img = fx.make_busybox_image(
        sandbox.root / "layout",
        "bb",
        {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["sleep 3"],
            "Healthcheck": {"Test": ["CMD", "/bin/true"], "Interval": 2000 * MS},
        },
    )
    r = sandbox.xbuild(img.ref, "-o", str(sandbox.out), "--kernel", str(default_kernel_path), "--no-verify")
    assert r.returncode == 0, r.stderr
    r = sandbox.xbuild("run", str(sandbox.out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["health"] == "healthy"
    assert "xbuild: health: healthy" in r.stderr
    r = sandbox.xbuild("run", str(sandbox.out), "--", "exit 0")
    assert r.returncode == 0
    assert "xbuild: health: starting (last state of the image's HEALTHCHECK)" in r.stderr, r.stderr
    r = sandbox.xbuild("run", str(sandbox.out), "--json", "--", "exit 0")
    assert json.loads(r.stdout)["health"] == "starting"


def test_health_source_error_names_the_field() -> None:
    with pytest.raises(SourceError, match="Healthcheck.StartInterval 5 ns"):
        Healthcheck(("CMD", "x"), start_interval_ns=5)
