"""Networking on Xen: the artifact's xen.cfg vif and `ip=` (build), the runners' use of the manifest's
network, and (slow) a hand-run `xl create xen.cfg` in the nested rig's dom0 set up as Debian's Xen wiki
documents (a bridge; busybox udhcpd standing in for the LAN's DHCP server) answering HTTP from dom0
(~7 min on a loaded 2-core host)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from builder.artifact import Artifact, Network, open_artifact
from builder.build import BuildOptions, build
from builder.errors import ArtifactError, ConfigError
from builder.run import xen
from tests.fixtures.artifacts import fake_artifact
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import dir, file, make_busybox_image
from tests.test_run_xen import needs_rig

PAGE = b"hello from the bridged guest\n"


def _xl(text: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in text.splitlines())


def _web_image(layout: Path, ports: bool = True) -> str:
    """busybox httpd serving PAGE on port 80; `ports`: the image says EXPOSE 80/tcp."""
    config = {"Cmd": ["httpd", "-f", "-p", "80", "-h", "/www"]}
    if ports:
        config["ExposedPorts"] = {"80/tcp": {}}  # type: ignore[assignment]
    img = make_busybox_image(
        layout, "web", config_overrides=config, extra_layers=[[dir("www/"), file("www/index.html", PAGE)]]
    )
    return img.ref


@pytest.fixture(scope="module")
def web_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _web_image(tmp_path_factory.mktemp("web") / "oci")


def _built(ref: str, out: Path, **opts: object) -> Artifact:
    return build(ref, BuildOptions(output=out, minimize="none", **opts))  # type: ignore[arg-type]


# ---- build: xen.cfg and the manifest -------------------------------------------------------------------


def test_exposed_ports_get_a_bridge_vif_and_dhcp(web_ref: str, tmp_path: Path) -> None:
    art = _built(web_ref, tmp_path / "a")
    cfg = _xl((art.path / "xen.cfg").read_text())
    assert cfg["vif"] == "[ 'bridge=xenbr0' ]"
    extra = cfg["extra"].strip('"').split()
    assert extra[0] == "console=hvc0" and extra.count("ip=dhcp") == 1 and extra[-1] == "ip=dhcp"
    assert "ip=" not in art.cmdline  # QEMU's runner sets its own; only xen.cfg says how dom0's network is
    assert json.loads((art.path / "manifest.json").read_text())["network"] == {"bridge": "xenbr0"}
    assert open_artifact(art.path).manifest.network == Network("xenbr0")


def test_network_flags(web_ref: str, tmp_path: Path) -> None:
    none = _built(web_ref, tmp_path / "none", network="none")
    assert "vif" not in _xl((none.path / "xen.cfg").read_text()) and none.manifest.network is None
    assert "ip=" not in (none.path / "xen.cfg").read_text()
    static = _built(web_ref, tmp_path / "static", bridge="br-lan", ip="192.168.7.20/24:192.168.7.1")
    cfg = _xl((static.path / "xen.cfg").read_text())
    assert cfg["vif"] == "[ 'bridge=br-lan' ]"
    assert cfg["extra"].endswith(' ip=192.168.7.20::192.168.7.1:255.255.255.0::eth0:off"')
    assert static.manifest.network == Network("br-lan", "192.168.7.20/24", "192.168.7.1")


def test_no_ports_no_vif_unless_asked(tmp_path: Path) -> None:
    ref = _web_image(tmp_path / "oci", ports=False)
    plain = _built(ref, tmp_path / "plain")
    assert "vif" not in (plain.path / "xen.cfg").read_text() and plain.manifest.network is None
    asked = _built(ref, tmp_path / "asked", network="bridge")
    assert _xl((asked.path / "xen.cfg").read_text())["vif"] == "[ 'bridge=xenbr0' ]"


def test_recipe_sets_the_bridge(web_ref: str, tmp_path: Path) -> None:
    recipe = tmp_path / "web.toml"
    recipe.write_text('[xen]\nbridge = "xenbr1"\n[kernel]\ncmdline = ["ip=off"]\n')
    art = _built(web_ref, tmp_path / "r", recipe=str(recipe))
    cfg = _xl((art.path / "xen.cfg").read_text())
    assert cfg["vif"] == "[ 'bridge=xenbr1' ]"
    words = cfg["extra"].strip('"').split()
    assert [w for w in words if w.startswith("ip=")] == ["ip=dhcp"]  # the recipe's ip= is replaced
    assert _built(web_ref, tmp_path / "f", recipe=str(recipe), bridge="br9").manifest.network == Network(
        "br9"
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bridge", "xenbr0,script=/tmp/x"], "--bridge: bridge 'xenbr0,script=/tmp/x' is not an interface"),
        (["--bridge", "a-bridge-name-too-long"], "is not an interface name"),
        (["--ip", "10.0.0.5"], "not a host address with its prefix"),
        (["--ip", "10.0.0.0/24"], "not a host address with its prefix"),
        (["--ip", "10.0.0.5/24:10.0.1.1"], "gateway 10.0.1.1 is not another address of 10.0.0.0/24"),
        (["--ip", "fd00::5/64"], "--ip fd00::5/64"),
        (["--ip", "10.0.0.5/24", "--network", "none"], "--network none gives the guest no network"),
    ],
)
def test_bad_network_flags_are_refused(sandbox: Sandbox, web_ref: str, args: list[str], needle: str) -> None:
    before = sandbox.snapshot()
    r = sandbox.xbuild(web_ref, "-o", str(sandbox.root / "work" / "out"), "--kernel", "none", *args)
    assert_refused(r, 2, needle)
    assert sandbox.changes(before) == []


def test_manifest_network_is_validated(tmp_path: Path) -> None:
    art = fake_artifact(tmp_path / "art", kernel=b"k", initrd=b"i", cmdline="console=hvc0")
    raw = json.loads((art.path / "manifest.json").read_text())
    for bad, needle in (
        ({"bridge": "br0,script=/bin/evil"}, "network: bridge"),
        ({"bridge": "br0", "address": "10.0.0.1/24", "gateway": "8.8.8.8"}, "network: gateway"),
        ({"bridge": 7}, "network.bridge"),
    ):
        (art.path / "manifest.json").write_text(json.dumps({**raw, "network": bad}))
        with pytest.raises(ArtifactError, match=needle):
            open_artifact(art.path)


# ---- the runners' xl config ----------------------------------------------------------------------------


def _networked(tmp_path: Path, cmdline: str) -> Artifact:
    art = fake_artifact(tmp_path / "art", kernel=b"k", initrd=b"i", cmdline=cmdline)
    raw = json.loads((art.path / "manifest.json").read_text())
    (art.path / "manifest.json").write_text(json.dumps({**raw, "network": {"bridge": "xenbr0"}}))
    return open_artifact(art.path)


def test_rig_ports_replace_the_artifacts_ip(tmp_path: Path) -> None:
    art = _networked(tmp_path, "console=ttyS0 quiet ip=dhcp -- httpd ip=x")
    cfg = _xl(
        xen.guest_config(
            art, name="xbuild", kernel="/k", ramdisk="/r", xen_type="pv", memory_mb=64, network=True, rig=True
        )
    )
    assert cfg["vif"] == "[ 'ip=10.0.3.2,script=/etc/xen/scripts/vif-xbuild' ]"
    head, _, tail = cfg["extra"].strip('"').partition(" -- ")
    assert [w for w in head.split() if w.startswith("ip=")] == [
        "ip=10.0.3.2::10.0.3.1:255.255.255.0::eth0:off"
    ]
    assert tail == "httpd ip=x"  # the image's arguments are not kernel words
    bare = _xl(
        xen.guest_config(art, name="xbuild", kernel="/k", ramdisk="/r", xen_type="pv", memory_mb=64, rig=True)
    )
    assert "vif" not in bare  # the rig has no bridge: a vif only with forwarded ports


def test_a_dom0_run_uses_the_manifests_network(tmp_path: Path) -> None:
    art = _networked(tmp_path, "console=ttyS0 quiet ip=off")
    cfg = _xl(xen.guest_config(art, name="g", kernel="/k", ramdisk="/r", xen_type="pvh", memory_mb=64))
    assert cfg["vif"] == "[ 'bridge=xenbr0' ]"
    assert cfg["extra"] == '"console=hvc0 quiet initramfs_async=0 ip=dhcp"'  # unpacked before the vif probes


def test_the_hand_run_check_needs_a_vif(tmp_path: Path) -> None:
    art = fake_artifact(tmp_path / "art", kernel=b"k", initrd=b"i", cmdline="console=hvc0")
    with pytest.raises(ConfigError, match="xen.cfg has a vif"):
        xen.run_nested(art, probe=xen.BridgeProbe())


# ---- the hand-run xen.cfg on a bridged dom0 (slow) -----------------------------------------------------


@pytest.mark.slow
@needs_rig
def test_hand_run_xen_cfg_answers_on_the_bridge(web_ref: str, tmp_path: Path) -> None:
    """The artifact's own xen.cfg, `xl create`d in dom0: the rig's vif-bridge puts the vif on xenbr0, the
    guest kernel's ip=dhcp gets a lease from udhcpd, and busybox nc in dom0 gets the page."""
    art = _built(web_ref, tmp_path / "web", xen_type="pv", memory_mb=64)  # PVH under TCG needs tsc_mode
    console = io.BytesIO()
    result = xen.run_nested(art, timeout=400, console=console, probe=xen.BridgeProbe(80))
    text = console.getvalue().decode(errors="replace")
    (tmp_path / "console.txt").write_text(text)
    print(text)
    assert "xenrig: guest leased 10.0.4.1" in text, (text, result.error)
    assert re.search(rf"answered: HTTP/1.[01] 200 OK \| {PAGE.decode().strip()}", text), (text, result.error)
    assert result.exit_status is not None, result


def test_rebuild_reproduces_the_network(web_ref: str, tmp_path: Path) -> None:
    """The resolved network is a build input: `xbuild rebuild` passes it back and gets the same xen.cfg."""
    from builder.rebuild import rebuild

    art = _built(
        web_ref, tmp_path / "a", bridge="br-lan", ip="192.168.7.20/24:192.168.7.1", epoch=1_700_000_000
    )
    result = rebuild(str(art.path))
    assert result.inputs.network == Network("br-lan", "192.168.7.20/24", "192.168.7.1")
    assert result.match, result.files
