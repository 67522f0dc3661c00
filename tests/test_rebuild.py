"""`xbuild rebuild` (builder/rebuild.py): the real CLI against the real test registry.

Built from a registry image and pushed, a VM image rebuilds to the same bytes, file for file, even after
the source tag moved (the source is fetched by its recorded digest); a tampered provenance is refused
(exit 2, one line) or reported as a mismatch (exit 1), and nothing is written outside the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from builder.artifact import PROVENANCE, SBOM
from builder.build import BuildOptions, build
from builder.rebuild import rebuild
from tests.fixtures.hostile import Sandbox, assert_refused
from tests.fixtures.images import OciImage, make_busybox_image, make_whiteout_image
from tests.fixtures.registry import Registry

SRC, VM = "rebuild/busybox", "rebuild/vm"
CHEAP = ("--minimize", "none", "--compression", "gzip:1")


@pytest.fixture(scope="module")
def pushed(registry: Registry, default_kernel_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A VM image built from the registry's busybox with a given kernel file, pushed: its reference."""
    work = tmp_path_factory.mktemp("rebuild")
    image = make_busybox_image(work / "oci")
    registry.push(image.layout, image.name, f"{SRC}:v1")
    box = Sandbox(work / "box")
    for d in (box.home, box.tmp, box.cache, box.root / "work"):
        d.mkdir(parents=True)
    ref = f"{registry.host}/{VM}:v1"
    r = box.xbuild(
        f"{registry.host}/{SRC}:v1",
        "-o",
        str(box.root / "work" / "art"),
        "--kernel",
        str(default_kernel_path),
        "--no-verify",
        "-q",
        *CHEAP,
        "--push",
        ref,
    )
    assert r.returncode == 0, r.stderr
    return ref


def _lines(stdout: str) -> dict[str, str]:
    """file name → 'match' / 'mismatch' from rebuild's output."""
    return {line.split()[1]: line.split()[0] for line in stdout.splitlines()}


def test_rebuild_ref_matches_even_after_the_tag_moved(
    sandbox: Sandbox, registry: Registry, pushed: str, tmp_path: Path
) -> None:
    before = sandbox.snapshot()
    r = sandbox.xbuild("rebuild", pushed)
    assert r.returncode == 0, r.stderr
    files = _lines(r.stdout)
    assert set(files.values()) == {"match"}
    assert set(files) == {"manifest.json", "initrd.img", "kernel", "cmdline", "xen.cfg", PROVENANCE, SBOM}
    assert "rebuild: all 7 files match" in r.stderr
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []
    # another image under the source's tag: the rebuild still takes the recorded digest
    other = make_whiteout_image(tmp_path / "other")
    registry.push(other.layout, other.name, f"{SRC}:v1")
    r = sandbox.xbuild("rebuild", pushed, "-q")
    assert r.returncode == 0 and set(_lines(r.stdout).values()) == {"match"}, r.stdout + r.stderr


def _pulled(sandbox: Sandbox, ref: str) -> Path:
    art = sandbox.root / "work" / "pulled"
    r = sandbox.xbuild("pull", ref, "-o", str(art))
    assert r.returncode == 0, r.stderr
    return art


def _tamper(art: Path, change: Any) -> None:
    doc = json.loads((art / PROVENANCE).read_text())
    change(doc)
    (art / PROVENANCE).write_text(json.dumps(doc))


def _ext(doc: dict[str, Any]) -> dict[str, Any]:
    ext: dict[str, Any] = doc["predicate"]["buildDefinition"]["externalParameters"]
    return ext


def test_tampered_provenance_source_digest_is_refused(
    sandbox: Sandbox, pushed: str, registry: Registry
) -> None:
    art = _pulled(sandbox, pushed)
    _tamper(art, lambda d: _ext(d).update({"source_digest": "sha256:" + "0" * 64}))
    # pushed as it is: the REF form reads the same provenance
    r = sandbox.xbuild("push", str(art), f"{registry.host}/{VM}:tampered", "-q")
    assert r.returncode == 0, r.stderr
    for target in (str(art), f"{registry.host}/{VM}:tampered"):
        before = sandbox.snapshot()
        r = sandbox.xbuild("rebuild", target, "-q")
        assert_refused(r, 2, "sha256:" + "0" * 64)
        assert r.stdout == "" and sandbox.changes(before) == [] and sandbox.stale_temps() == []


def test_tampered_options_give_a_mismatch(sandbox: Sandbox, pushed: str) -> None:
    art = _pulled(sandbox, pushed)
    _tamper(art, lambda d: _ext(d).update({"memory_mb": 64}))
    before = sandbox.snapshot()
    r = sandbox.xbuild("rebuild", str(art))
    assert r.returncode == 1, r.stderr
    files = _lines(r.stdout)
    assert files["initrd.img"] == files["kernel"] == files["cmdline"] == files[SBOM] == "match"
    assert files["manifest.json"] == files["xen.cfg"] == files[PROVENANCE] == "mismatch"
    assert "rebuild: 3 of 7 files differ" in r.stderr
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


def test_a_subject_digest_that_lies_is_a_mismatch(sandbox: Sandbox, pushed: str) -> None:
    art = _pulled(sandbox, pushed)
    _tamper(art, lambda d: d["subject"][0]["digest"].update({"sha256": "1" * 64}))
    name = json.loads((art / PROVENANCE).read_text())["subject"][0]["name"]
    r = sandbox.xbuild("rebuild", str(art))
    assert r.returncode == 1, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.split()[1] == name)
    assert line.startswith("mismatch") and "provenance sha256:1111111111111111" in line


def test_other_inputs_here_are_refused(sandbox: Sandbox, pushed: str) -> None:
    """A kernel file that is not the recorded one, an xbuild version that is not this one: exit 2."""
    art = _pulled(sandbox, pushed)
    _tamper(art, lambda d: _ext(d).update({"xbuild_version": "0.0.1"}))
    r = sandbox.xbuild("rebuild", str(art), "-q")
    assert_refused(r, 2, "the inputs differ from the recorded ones", 'xbuild_version: "0.0.1" recorded')
    _tamper(art, lambda d: _ext(d).update({"kernel": {"source": "/nonexistent/vmlinuz", "sha256": "2" * 64}}))
    r = sandbox.xbuild("rebuild", str(art), "-q")
    assert_refused(r, 2, "--kernel /nonexistent/vmlinuz: no such file")


def test_changed_recipe_is_refused(sandbox: Sandbox, busybox_image: OciImage) -> None:
    recipe = sandbox.root / "work" / "mine.toml"
    recipe.write_text('[keep]\npaths = ["/etc"]\n')
    art = sandbox.root / "work" / "art"
    r = sandbox.xbuild(busybox_image.ref, "-o", str(art), "--kernel", "none", "--recipe", str(recipe), "-q")
    assert r.returncode == 0, r.stderr
    r = sandbox.xbuild("rebuild", str(art), "--recipe", str(recipe), "-q")
    assert r.returncode == 0 and set(_lines(r.stdout).values()) == {"match"}, r.stdout + r.stderr
    recipe.write_text('[keep]\npaths = ["/etc", "/bin"]\n')
    before = sandbox.snapshot()
    r = sandbox.xbuild("rebuild", str(art), "--recipe", str(recipe), "-q")
    assert_refused(r, 2, "recipe mine changed since the build")
    assert sandbox.changes(before) == [] and sandbox.stale_temps() == []


def test_an_artifact_without_provenance(sandbox: Sandbox, busybox_image: OciImage) -> None:
    art = sandbox.root / "work" / "art"
    r = sandbox.xbuild(busybox_image.ref, "-o", str(art), "--kernel", "none", "-q")
    assert r.returncode == 0, r.stderr
    (art / PROVENANCE).unlink()
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["provenance"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(sandbox.xbuild("rebuild", str(art), "-q"), 2, "no provenance.intoto.json")


def test_rebuild_with_the_default_kernel(tmp_path: Path) -> None:
    """In process, the warm cache: the trimmed kernel is recorded by its key and taken from the cache."""
    image = make_busybox_image(tmp_path / "oci")
    art = tmp_path / "art"
    build(image.ref, BuildOptions(output=art, epoch=1_700_000_000, compression="gzip", level=1))
    result = rebuild(str(art))
    assert result.match and {f.name for f in result.files} >= {"kernel", PROVENANCE}
    assert result.inputs.kernel is not None and result.inputs.kernel.key is not None
    shutil.rmtree(art)
