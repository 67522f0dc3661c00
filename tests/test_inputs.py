"""Build inputs (builder/inputs.py): the artifact's key covers every input, each one provably.

The per-field test is generated from the dataclasses' fields (nested ones included), so a field added to
BuildInputs is tested without anyone remembering to; the build tests run the real build.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from builder.artifact import Network
from builder.build import BuildOptions, build
from builder.errors import ArtifactError
from builder.image import Healthcheck
from builder.inputs import BuildInputs, DiskInput, KernelInput
from tests.fixtures.images import OciImage

SHA = "ab" * 32

# every field set (optional ones too), so that every leaf exists to be changed
FULL = BuildInputs(
    source_reference="registry.example/app:1",
    source_digest="sha256:" + "01" * 32,
    platform="linux/amd64",
    minimize="auto",
    init_key="02" * 32,
    xbuild_version="0.1.0",
    compression="zstd",
    format="disk",
    memory_mb=128,
    xen_type="pvh",
    hostname="app",
    cmdline="quiet rdinit=/init",
    recipe="nginx",
    recipe_sha256="03" * 32,
    kernel=KernelInput(key="04" * 32, fragments=("base", "xen"), source="oci://k/x:1", sha256=None),
    level=3,
    disk=DiskInput(format="raw", mode="rw", size=1 << 30),
    healthcheck=Healthcheck(("CMD", "true"), 1_000_000_000, 2_000_000_000, 0, 0, 3),
    source_date_epoch=1_700_000_000,
    network=Network("xenbr0", "10.0.4.5/24", "10.0.4.1"),
)


def _other(value: Any, hint: Any) -> Any:
    """A value of type `hint` different from `value`: for an optional section, None (its fields are changed
    one by one); a string, a number or a list changed (durations stay valid: at least 1 ms)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return None if dataclasses.is_dataclass(inner) else _other(value, inner)
    if origin is tuple:
        return (*(value or ()), "more")
    if hint is str:
        return (value or "") + "x"
    if hint is int:
        return (value or 0) + 1_000_000
    raise AssertionError(f"no alternative for {hint}")


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every field, nested dataclasses' fields included (and the nested field itself)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append((*prefix, f.name))
        inner = [a for a in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(a)]
        if inner:
            out += _leaves(inner[0], (*prefix, f.name))
    return out


def _changed(obj: Any, path: tuple[str, ...], make: Any = _other) -> Any:
    """`obj` with the field at `path` given another value (`make(value, hint)`)."""
    name, rest = path[0], path[1:]
    value = getattr(obj, name)
    new = _changed(value, rest, make) if rest else make(value, typing.get_type_hints(type(obj))[name])
    return dataclasses.replace(obj, **{name: new})


def _valid_change(path: tuple[str, ...]) -> tuple[BuildInputs, BuildInputs]:
    """(base, base with the field at `path` changed): FULL, or for a given kernel's sha256 FULL with a
    kernel file (a kernel is built (key) or given (sha256), never both)."""
    base = FULL
    if path == ("kernel", "sha256"):
        base = dataclasses.replace(FULL, kernel=KernelInput(source="/boot/vmlinuz", sha256=SHA))
    if path in CHOSEN or path in ADDRESSES:  # one of an enum's values, or an address: another one
        return base, _changed(base, path, lambda value, hint: {**CHOSEN, **ADDRESSES}[path])
    return base, _changed(base, path)


CHOSEN = {
    ("minimize",): "trace",
    ("format",): "initramfs",
    ("xen_type",): "pv",
    ("disk", "format"): "qcow2",
    ("disk", "mode"): "ro",
}
ADDRESSES = {("network", "address"): "10.0.4.6/24", ("network", "gateway"): "10.0.4.2"}  # still valid


FIELDS = [p for p in _leaves(BuildInputs) if p != ("schema",)]


@pytest.mark.parametrize("path", FIELDS, ids=[".".join(p) for p in FIELDS])
def test_every_input_changes_the_key(path: tuple[str, ...]) -> None:
    base, changed = _valid_change(path)
    assert changed != base
    assert changed.key() != base.key(), f"changing {'.'.join(path)} left the key as it was"
    # and the value is not lost on the way through JSON (what the provenance records, rebuild reads)
    assert BuildInputs.from_json(json.loads(changed.canonical())) == changed


def test_the_fields_are_all_covered() -> None:
    """Guard of the generator: every top-level field and every nested one is in FIELDS."""
    names = {p[0] for p in FIELDS} | {"schema"}
    assert names == {f.name for f in dataclasses.fields(BuildInputs)}
    assert (
        ("kernel", "fragments") in FIELDS and ("disk", "size") in FIELDS and ("healthcheck", "test") in FIELDS
    )


def test_canonical_json_is_stable() -> None:
    raw = FULL.canonical()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    again = BuildInputs.from_json(json.loads(raw))
    assert again == FULL and again.key() == FULL.key()
    assert len(FULL.key()) == 64 and int(FULL.key(), 16) >= 0


def test_schema_is_checked() -> None:
    obj = json.loads(FULL.canonical())
    obj["schema"] = "xbuild.inputs.v0"
    with pytest.raises(ArtifactError, match="schema"):
        BuildInputs.from_json(obj)
    del obj["source_digest"]
    obj["schema"] = FULL.schema
    with pytest.raises(ArtifactError, match="no source_digest"):
        BuildInputs.from_json(obj)
    obj["source_digest"] = 5
    with pytest.raises(ArtifactError, match="source_digest: expected str"):
        BuildInputs.from_json(obj)


def test_choices_are_checked() -> None:
    for path in CHOSEN:
        with pytest.raises(ArtifactError, match="is not one of"):
            _changed(FULL, path)


def test_kernel_is_built_or_given() -> None:
    with pytest.raises(ArtifactError, match="exactly one"):
        KernelInput(key=SHA, sha256=SHA)
    with pytest.raises(ArtifactError, match="exactly one"):
        KernelInput()


# ---- the real build ---------------------------------------------------------------------------------------

_KEY_OF = """
import sys
from builder.build import BuildOptions, build
keys = []
build(sys.argv[1], BuildOptions(output=__import__("pathlib").Path(sys.argv[2]), epoch=1700000000,
      kernel=None, log=lambda m: keys.append(m.split()[-1]) if m.startswith("build key ") else None))
print(keys[0])
"""


def _key_in_process(ref: str, out: Path) -> str:
    r = subprocess.run(
        [sys.executable, "-c", _KEY_OF, ref, str(out)], capture_output=True, text=True, check=True
    )
    return r.stdout.strip()


def test_same_inputs_same_key_in_two_runs(busybox_image: OciImage, tmp_path: Path) -> None:
    """Two processes building the same image with the same options compute the same key."""
    first = _key_in_process(busybox_image.ref, tmp_path / "a")
    second = _key_in_process(busybox_image.ref, tmp_path / "b")
    assert first == second and len(first) == 64


def test_a_build_option_changes_the_key(busybox_image: OciImage, tmp_path: Path) -> None:
    """The key the build computes follows its options: memory, compression, epoch each give another."""
    keys: list[str] = []

    def key_of(**kw: Any) -> str:
        seen: list[str] = []
        opts = BuildOptions(
            output=tmp_path / f"o{len(keys)}",
            epoch=kw.pop("epoch", 1_700_000_000),
            kernel=None,
            log=lambda m: seen.append(m.split()[-1]) if m.startswith("build key ") else None,
            **kw,
        )
        build(busybox_image.ref, opts)
        keys.append(seen[0])
        return seen[0]

    base = key_of()
    assert key_of() == base
    for change in (
        {"memory_mb": 64},
        {"compression": "gzip"},
        {"epoch": 1_700_000_001},
        {"hostname": "other"},
    ):
        assert key_of(**change) != base, change


def test_product_keys_without_building(tmp_path: Path) -> None:
    """kernel.build_key and init.key are the keys the built products are cached under (the warm cache's
    default kernel; the init compiled here)."""
    from builder import init, kernel
    from builder.cache import cache_dir

    assert kernel.build_key(kernel.DEFAULT_FRAGMENTS) == kernel.default_kernel().key
    init.init_binary()
    assert (cache_dir("init", init.key()) / "init").is_file()
