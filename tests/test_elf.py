"""ELF closure rules (builder/elf.py) on real Debian binaries of the host and on crafted ELF files."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import elf
from builder.errors import BadInput, MinimizeError
from builder.tree import Tree
from tests.fixtures.minimize_images import add_file, add_host_file, add_link, host_tree

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
LS = "/usr/bin/ls"


def names(objs: list[elf.Loaded]) -> set[str]:
    return {o.real.rsplit("/", 1)[-1] for o in objs}


# -- real Debian binaries ----------------------------------------------------------------------------


def test_parse_real_binary() -> None:
    info = elf.parse(Path(LS).read_bytes(), LS)
    assert info.interp == "/lib64/ld-linux-x86-64.so.2"
    assert "libc.so.6" in info.needed
    assert info.elfclass == 64 and info.machine == "EM_X86_64"
    assert "iconv_open" not in info.undefined and "opendir" in info.undefined


def _pyelftools_facts(path: Path) -> tuple[object, ...]:
    """What parse reports, read by pyelftools (the reader parse replaced): the oracle of the test below."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        e = ELFFile(f)
        interp = next((s.get_interp_name() for s in e.iter_segments() if s["p_type"] == "PT_INTERP"), None)
        needed, rpath, runpath, undefined = [], [], [], set()
        for sec in e.iter_sections():
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    t = tag.entry.d_tag
                    if t == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif t == "DT_RPATH":
                        rpath += tag.rpath.split(":")
                    elif t == "DT_RUNPATH":
                        runpath += tag.runpath.split(":")
            elif sec["sh_type"] == "SHT_DYNSYM":
                undefined |= {s.name for s in sec.iter_symbols() if s["st_shndx"] == "SHN_UNDEF" and s.name}
        return (e.elfclass, str(e["e_machine"]), str(e["e_type"]), interp, needed, rpath, runpath, undefined)


def _pyelftools_loads_and_notes(
    path: Path,
) -> tuple[list[tuple[int, int]], list[tuple[str, int | None, bytes]]]:
    """The PT_LOAD segments (physical address, size in memory) and the notes (name, type where pyelftools
    names it by a known number, descriptor) of the PT_NOTE segments, else of the SHT_NOTE sections, read
    by pyelftools."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.enums import ENUM_CORE_NOTE_N_TYPE, ENUM_NOTE_N_TYPE

    numbers = {k: v for enum in (ENUM_NOTE_N_TYPE, ENUM_CORE_NOTE_N_TYPE) for k, v in enum.items()}
    with path.open("rb") as f:
        e = ELFFile(f)
        segments = list(e.iter_segments())
        loads = [(s["p_paddr"], s["p_memsz"]) for s in segments if s["p_type"] == "PT_LOAD"]
        holders = [s for s in segments if s["p_type"] == "PT_NOTE"]
        holders = holders or [s for s in e.iter_sections() if s["sh_type"] == "SHT_NOTE"]
        notes = [
            (
                n["n_name"],
                n["n_type"] if isinstance(n["n_type"], int) else numbers.get(n["n_type"]),
                n["n_descdata"],
            )
            for h in holders
            for n in h.iter_notes()
        ]
    return loads, notes


def test_parse_agrees_with_pyelftools_on_the_hosts_objects() -> None:
    """Every 12th ELF object of the host's /usr/bin and amd64 library directory, and every object of its arm64
    (cross) libc: the same interpreter, needed list, paths, undefined symbols, class, machine and type, the
    same loadable segments and notes, as pyelftools reads (pyelftools takes ~0.1 s an object: the whole
    host would take minutes)."""
    dirs = [Path("/usr/bin"), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/aarch64-linux-gnu/lib")]
    paths = [p for d in dirs if d.is_dir() for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()]
    found = [p for p in paths if p.open("rb").read(4) == elf.ELF_MAGIC]
    objects = [p for i, p in enumerate(found) if i % 12 == 0 or p.is_relative_to("/usr/aarch64-linux-gnu")]
    assert len(objects) > 50
    machines, properties = set(), 0
    for p in objects:
        data = p.read_bytes()
        i = elf.parse(data, str(p))
        facts = (i.elfclass, i.machine, i.etype, i.interp, list(i.needed), list(i.rpath), list(i.runpath))
        assert (*facts, set(i.undefined)) == _pyelftools_facts(p), p
        loads, notes = _pyelftools_loads_and_notes(p)
        assert [(s.paddr, s.memsz) for s in elf.loads(data, str(p), MinimizeError)] == loads, p
        ours = list(elf.notes(data, str(p), MinimizeError))
        assert len(ours) == len(notes), p
        assert [
            (n, t if k is not None else None, d) for (n, t, d), (_, k, _) in zip(ours, notes, strict=True)
        ] == notes
        machines.add(i.machine)
        properties += sum(1 for n, t, _ in ours if (n, t) == ("GNU", 5))  # NT_GNU_PROPERTY_TYPE_0
    assert {"EM_X86_64", "EM_AARCH64"} <= machines
    assert properties  # amd64's property notes sit in 8-aligned tables: that padding was read too


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3FFF), st.integers(0, 255)), min_size=1, max_size=12))
def test_parse_of_a_corrupted_object_is_facts_or_malformed(edits: list[tuple[int, int]]) -> None:
    """Bytes overwritten anywhere in the headers and tables of a real object (ls: its ELF header, program
    headers and the start of its dynamic tables): parse, loads and notes return facts or refuse with the
    error they are given, never another exception, whatever sizes and offsets the headers then claim."""
    data = bytearray(Path(LS).read_bytes())
    shoff = int.from_bytes(data[0x28:0x30], "little")
    for at, value in edits:
        data[at if at < 0x2000 else shoff + (at - 0x2000) % (len(data) - shoff)] = value
    with contextlib.suppress(MinimizeError):
        assert all(s.memsz >= 0 for s in elf.loads(bytes(data), "/x", MinimizeError))
    with contextlib.suppress(MinimizeError):
        assert all(isinstance(d, bytes) for _, _, d in elf.notes(bytes(data), "/x", MinimizeError))
    try:
        info = elf.parse(bytes(data), "/x")
    except MinimizeError:
        return
    assert info.elfclass in (32, 64) and all(isinstance(n, str) for n in info.needed)


def test_parse_rejects_non_elf() -> None:
    with pytest.raises(MinimizeError, match="not an ELF"):
        elf.parse(b"#!/bin/sh\n", "/x")
    with pytest.raises(MinimizeError, match="malformed ELF"):
        elf.parse(elf.ELF_MAGIC + b"\x02\x01\x01" + b"\0" * 9 + b"\xff" * 40, "/x")


def test_closure_of_real_ls_through_merged_usr_links() -> None:
    tree = host_tree(
        [
            LS,
            "/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/x86_64-linux-gnu",
            "/lib",
            "/etc/ld.so.conf",
            "/etc/ld.so.conf.d",
        ]
    )
    for lib in ("libc.so.6", "libselinux.so.1", "libpcre2-8.so.0"):
        host_tree([f"/usr/lib/x86_64-linux-gnu/{lib}"], tree)
    for f in Path("/etc/ld.so.conf.d").glob("*.conf"):
        host_tree([str(f)], tree)
    objs, missing = elf.Resolver(tree).closure("usr/bin/ls")
    assert not missing
    assert {"ls", "ld-linux-x86-64.so.2", "libc.so.6", "libselinux.so.1"} <= names(objs)
    interp = [o for o in objs if o.name == "/lib64/ld-linux-x86-64.so.2"]
    assert interp and interp[0].path == "lib64/ld-linux-x86-64.so.2"
    # the lib64 -> usr/lib64 link and the ld.so symlink are on the way
    chain = elf.symlink_chain(tree, interp[0].path)
    assert chain[0] == "lib64"


def test_missing_library_names_it_and_its_user() -> None:
    tree = host_tree([LS, "/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/libc.so.6"])
    with pytest.raises(MinimizeError, match=r"/usr/bin/ls needs the shared library libselinux\.so\.1") as e:
        elf.Resolver(tree).closure("usr/bin/ls")
    assert isinstance(e.value, BadInput)
    objs, missing = elf.Resolver(tree).closure("usr/bin/ls", strict=False)
    assert any("libselinux.so.1" in m for m in missing)


def test_missing_interpreter_is_an_error() -> None:
    tree = Tree()
    add_host_file(tree, "usr/bin/ls", LS)
    with pytest.raises(MinimizeError, match="program interpreter /lib64/ld-linux-x86-64.so.2"):
        elf.Resolver(tree).closure("usr/bin/ls")


# -- ld.so.conf --------------------------------------------------------------------------------------


def test_ld_so_conf_includes_globs_comments_and_loops() -> None:
    t = Tree()
    add_file(
        t,
        "etc/ld.so.conf",
        b"# comment\n/opt/first\ninclude /etc/ld.so.conf.d/*.conf\n"
        b"include ld.so.conf\nhwcap 0 nosegneg\n/opt/last:/opt/last2\n",
    )
    add_file(t, "etc/ld.so.conf.d/b.conf", b"/opt/b  # trailing comment\n")
    add_file(t, "etc/ld.so.conf.d/a.conf", b"/opt/a\n/opt/first\n")
    add_file(t, "etc/ld.so.conf.d/c.txt", b"/opt/not-included\n")
    assert elf.ld_so_conf(t) == ["opt/first", "opt/a", "opt/b", "opt/last", "opt/last2"]
    assert elf.ld_so_conf(Tree()) == []


def test_glob_inside_tree() -> None:
    t = Tree()
    for n in ("x.conf", "y.conf", ".hidden.conf", "z.txt"):
        add_file(t, f"etc/d/{n}")
    assert elf.glob(t, "/etc/d/*.conf") == ["etc/d/x.conf", "etc/d/y.conf"]
    assert elf.glob(t, "/etc/nope/*") == []


# -- crafted ELF files ---------------------------------------------------------------------------------


def cc(tmp: Path, name: str, src: str, *args: str) -> Path:
    (tmp / f"{name}.c").write_text(src)
    out = tmp / name
    subprocess.run(
        ["gcc", "-O1", "-o", str(out), str(tmp / f"{name}.c"), *args, f"-Wl,-rpath-link,{tmp}"],
        check=True,
        cwd=tmp,
    )
    return out


def libc_tree() -> Tree:
    return host_tree(["/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib"])


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    tmp = tmp_path_factory.mktemp("elf")
    cc(tmp, "libb.so", "int b(void){return 2;}", "-shared", "-fPIC")
    cc(tmp, "liba.so", "int b(void); int a(void){return b()+1;}", "-shared", "-fPIC", f"-L{tmp}", "-lb")
    main = "int a(void); int main(void){return a();}"
    cc(tmp, "runpath", main, f"-L{tmp}", "-la", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib")
    cc(tmp, "rpath", main, f"-L{tmp}", "-la", "-Wl,--disable-new-dtags,-rpath,$ORIGIN/../lib")
    cc(tmp, "iconv", '#include <iconv.h>\nint main(void){return iconv_open("UTF-8","LATIN1")==0;}')
    return tmp


def test_runpath_origin(crafted: Path) -> None:
    info = elf.parse((crafted / "runpath").read_bytes())
    assert info.runpath == ("$ORIGIN/../lib",) and not info.rpath
    t = libc_tree()
    add_host_file(t, "opt/app/bin/app", str(crafted / "runpath"))
    add_host_file(t, "opt/app/lib/liba.so", str(crafted / "liba.so"))
    add_host_file(t, "usr/lib/x86_64-linux-gnu/libb.so", str(crafted / "libb.so"))  # default dir
    objs, _ = elf.Resolver(t).closure("opt/app/bin/app")
    by = {o.real: o for o in objs}
    assert "opt/app/lib/liba.so" in by and by["opt/app/lib/liba.so"].needed_by == "opt/app/bin/app"
    assert "usr/lib/x86_64-linux-gnu/libb.so" in by


def test_runpath_is_not_inherited_but_rpath_is(crafted: Path) -> None:
    """glibc: DT_RUNPATH applies to the object's own DT_NEEDED only; DT_RPATH of the executable also
    serves the libraries it loads."""
    for exe, inherited in (("rpath", True), ("runpath", False)):
        t = libc_tree()
        add_host_file(t, "opt/app/bin/app", str(crafted / exe))
        add_host_file(t, "opt/app/lib/liba.so", str(crafted / "liba.so"))
        add_host_file(t, "opt/app/lib/libb.so", str(crafted / "libb.so"))  # only via the exe's path
        if inherited:
            objs, _ = elf.Resolver(t).closure("opt/app/bin/app")
            assert "opt/app/lib/libb.so" in {o.real for o in objs}
        else:
            with pytest.raises(
                MinimizeError, match=r"/opt/app/lib/liba\.so needs the shared library libb\.so"
            ):
                elf.Resolver(t).closure("opt/app/bin/app")


def test_origin_of_symlinked_executable_is_its_real_dir(crafted: Path) -> None:
    t = libc_tree()
    add_host_file(t, "opt/app/bin/app", str(crafted / "rpath"))
    add_host_file(t, "opt/app/lib/liba.so", str(crafted / "liba.so"))
    add_host_file(t, "opt/app/lib/libb.so", str(crafted / "libb.so"))
    add_link(t, "usr/bin/app", "../../opt/app/bin/app")
    objs, _ = elf.Resolver(t).closure("usr/bin/app")
    assert {"opt/app/lib/liba.so", "opt/app/lib/libb.so"} <= {o.real for o in objs}


def test_ld_library_path_from_env_and_non_elf_candidates_skipped(crafted: Path) -> None:
    t = libc_tree()
    add_host_file(t, "app", str(crafted / "runpath"))  # $ORIGIN/../lib = /lib: not there
    add_file(t, "first/liba.so", b"not an ELF file at all, ld.so skips it" * 3)
    add_host_file(t, "second/liba.so", str(crafted / "liba.so"))
    add_host_file(t, "second/libb.so", str(crafted / "libb.so"))
    with pytest.raises(MinimizeError, match="liba.so"):
        elf.Resolver(t).closure("app")
    objs, _ = elf.Resolver(t, ("LD_LIBRARY_PATH=/first:/second",)).closure("app")
    assert {"second/liba.so", "second/libb.so"} <= {o.real for o in objs}


def test_ld_so_conf_dirs_are_searched(crafted: Path) -> None:
    t = libc_tree()
    add_host_file(t, "usr/bin/app", str(crafted / "runpath"))
    add_host_file(t, "opt/libs/liba.so", str(crafted / "liba.so"))
    add_host_file(t, "opt/more/libb.so", str(crafted / "libb.so"))
    add_file(t, "etc/ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n")
    add_file(t, "etc/ld.so.conf.d/x.conf", b"/opt/libs\n/opt/more\n")
    objs, _ = elf.Resolver(t).closure("usr/bin/app")
    assert {"opt/libs/liba.so", "opt/more/libb.so"} <= {o.real for o in objs}


def test_cyclic_symlinks_do_not_hang(crafted: Path) -> None:
    t = libc_tree()
    add_host_file(t, "usr/bin/app", str(crafted / "runpath"))
    add_link(t, "usr/lib/x86_64-linux-gnu/liba.so", "libloop.so")
    add_link(t, "usr/lib/x86_64-linux-gnu/libloop.so", "liba.so")
    with pytest.raises(MinimizeError, match="liba.so"):
        elf.Resolver(t).closure("usr/bin/app")
    assert len(elf.symlink_chain(t, "usr/lib/x86_64-linux-gnu/liba.so")) > 1


def test_static_binary_has_no_closure(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    cc_ = shutil.which("musl-gcc") or "gcc"
    (tmp_path / "s.c").write_text("int main(void){return 0;}")
    subprocess.run([cc_, "-static", "-o", str(tmp_path / "s"), str(tmp_path / "s.c")], check=True)
    t = Tree()
    add_host_file(t, "s", str(tmp_path / "s"))
    objs, missing = elf.Resolver(t).closure("s")
    assert [o.path for o in objs] == ["s"] and objs[0].info.static and not missing


def test_iconv_import_is_visible(crafted: Path) -> None:
    assert "iconv_open" in elf.parse((crafted / "iconv").read_bytes()).undefined


def test_musl_search_path(crafted: Path) -> None:
    info = elf.ElfInfo(64, "EM_X86_64", "ET_EXEC", interp="/lib/ld-musl-x86_64.so.1")
    t = Tree()
    r = elf.Resolver(t)
    assert r.default_dirs(info) == ["lib", "usr/local/lib", "usr/lib"]
    add_file(t, "etc/ld-musl-x86_64.path", b"/opt/lib:/usr/lib\n")
    assert elf.Resolver(t).default_dirs(info) == ["opt/lib", "usr/lib"]
    assert os.path.exists(crafted)
