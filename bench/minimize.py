"""Minimize benchmark: per fixture image, source size (the flattened image as an uncompressed cpio),
minimized initrd size (zstd -19, lz4 -9, uncompressed), ratio (source / zstd initrd), minimize time and
build time (flatten + minimize + zstd pack); with --smoke also runs the minimized root fs in the host
probe (builder.minimize.probe: netns + chroot) and checks the recipe's smoke test (a quick stand-in for
the QEMU --verify boot: same files, the host's kernel).

    python bench/minimize.py [--smoke] [--json] [NAME=oci:LAYOUT:TAG ...]
    python bench/minimize.py --corpus [--json] [APP ...]

--corpus: the compatibility corpus (tests/fixtures/corpus.py, layouts built on first use): per app the
flattened image (uncompressed cpio) -> the initrd `xbuild build --minimize auto` writes (zstd -19), the
build's wall time (the real CLI), and launch -> first good answer: `xbuild run -p` under QEMU until the
app's real client (HTTP GET, psql, the redis/memcached protocol) gets a good answer. Exits 1 when an app
fails or a size limit (LIMITS: nginx look-alike <= 4.5 MB, redis <= 7 MB) is exceeded.

Without arguments it uses the fixture layouts NAME-layout under $XBUILD_FIXTURES (default
$XBUILD_CACHE/fixtures, where the slow tests build them with tests/fixtures/build-*-oci.sh).
The chroot probe needs root (unshare --net, chroot).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.cpio import pack  # noqa: E402
from builder.errors import MinimizeError  # noqa: E402
from builder.flatten import flatten  # noqa: E402
from builder.image import ImageConfig  # noqa: E402
from builder.minimize import minimize  # noqa: E402
from builder.minimize.probe import probe  # noqa: E402
from builder.recipes import Recipe, load_recipe, smoke_test  # noqa: E402
from builder.reference import parse  # noqa: E402
from builder.source import load  # noqa: E402
from builder.tree import Tree  # noqa: E402
from tests.fixtures.corpus import APPS, build, layout_ref, serve  # noqa: E402

FIXTURES = Path(
    os.environ.get("XBUILD_FIXTURES")
    or Path(os.environ.get("XBUILD_CACHE", Path.home() / ".cache" / "xbuild")) / "fixtures"
)
DEFAULT = {  # name -> (layout dir, tag, recipe); built by tests/fixtures/build-*-oci.sh
    "nginx": ("nginx-layout", "nginx", "nginx"),
    "redis": ("redis-layout", "redis", "redis"),
    "python-web": ("python-web-layout", "python-web", "python-web"),
    "busybox-httpd": ("busybox-httpd-layout", "busybox-httpd", "busybox-httpd"),
    "static-hello": ("static-hello-layout", "static-hello", "static-hello"),
}


def chroot_smoke(tree: Tree, config: ImageConfig, recipe: Recipe) -> tuple[bool, str]:
    """Run the minimized tree's entrypoint in the host probe (netns + chroot) and check the smoke test."""
    timeout = recipe.smoke.timeout if recipe.smoke else 10.0
    try:
        r = probe(tree, config, recipe, seconds=min(timeout, 30.0))
    except MinimizeError as e:
        return False, str(e)
    if recipe.smoke is None or recipe.smoke.kind == "console":
        return smoke_test(recipe, r.output)
    if r.smoke is None:
        return False, "no smoke result: " + r.output.decode("utf-8", "replace")[-400:]
    ok, msg = r.smoke
    return ok, msg if ok else msg + " | output: " + r.output.decode("utf-8", "replace")[-400:]


def bench_one(name: str, ref: str, recipe_name: str, smoke: bool) -> dict[str, object]:
    image = load(parse(ref))
    t0 = time.monotonic()
    flat = flatten(image)
    t1 = time.monotonic()
    recipe = load_recipe(recipe_name)
    tree, report = minimize(flat.tree, image.config, recipe)
    t2 = time.monotonic()
    row: dict[str, object] = {"fixture": name, "ref": ref}
    with tempfile.TemporaryDirectory() as tmp:
        full = pack(flat.tree, Path(tmp) / "full", "none")
        row["source_bytes"] = full.uncompressed_size
        for comp in ("zstd", "lz4", "none"):
            t = time.monotonic()
            p = pack(tree, Path(tmp) / f"min.{comp}", comp)
            row[f"initrd_{comp}"] = p.size
            if comp == "zstd":
                row["pack_zstd_s"] = round(time.monotonic() - t, 2)
    row["ratio"] = round(int(row["source_bytes"]) / int(row["initrd_zstd"]), 1)  # type: ignore[call-overload]
    row["flatten_s"] = round(t1 - t0, 2)
    row["minimize_s"] = round(t2 - t1, 2)
    row["build_s"] = round(t2 - t0 + float(row["pack_zstd_s"]), 2)  # type: ignore[arg-type]
    row["kept_files"] = report.kept_files
    row["dropped_files"] = report.dropped_files
    if smoke:
        ok, msg = chroot_smoke(tree, image.config, recipe)
        row["smoke"] = ("PASS " if ok else "FAIL ") + msg
    return row


LIMITS = {"nginx": 4_500_000, "redis": 7_000_000}  # initrd (zstd-19) bytes, issue 13


def corpus_row(name: str) -> dict[str, object]:
    """One corpus app: flattened size, auto-minimized initrd size, build time, launch -> first answer."""
    app = APPS[name]
    ref = layout_ref(app)
    row: dict[str, object] = {"app": name, "ref": ref}
    with tempfile.TemporaryDirectory() as tmp:
        row["flat_bytes"] = pack(flatten(load(parse(ref))).tree, Path(tmp) / "full", "none").uncompressed_size
        built = build(ref, Path(tmp) / "artifact")
        row["build_s"] = round(built.seconds, 1)
        if built.returncode:
            row["result"] = "BUILD FAILED " + built.stderr.strip()[-300:]
            return row
        row["initrd_zstd"] = (built.artifact / "initrd.img").stat().st_size
        served = serve(app, built.artifact)
    row["answer_s"] = round(served.seconds, 1) if served.ok else None
    limit = LIMITS.get(name)
    over = limit is not None and int(row["initrd_zstd"]) > limit  # type: ignore[call-overload]
    row["result"] = (
        ("PASS " if served.ok and not over else "FAIL ")
        + served.answer[:120]
        + (f" (initrd over the {limit / 1e6:.1f} MB limit)" if over and limit else "")
    )
    return row


def corpus_table(names: list[str], as_json: bool) -> int:
    """The table, a row printed as soon as its app is done (a whole run takes an hour on 2 cores)."""
    rows = []
    if not as_json:
        print(
            f"{'app':14} {'flattened':>10} {'initrd':>9} {'ratio':>6} {'build s':>8} {'answer s':>9}  result",
            flush=True,
        )
    for n in names or list(APPS):
        r = corpus_row(n)
        rows.append(r)
        if not as_json:
            flat, initrd = int(r["flat_bytes"]), int(r.get("initrd_zstd", 0))  # type: ignore[call-overload]
            ratio = f"{flat / initrd:5.1f}x" if initrd else "     -"
            print(
                f"{r['app']:14} {flat / 1e6:>8.1f}MB {initrd / 1e6:>7.2f}MB {ratio:>6} {r['build_s']:>8} "
                f"{r.get('answer_s') or '-':>9}  {r['result']}",
                flush=True,
            )
    if as_json:
        print(json.dumps(rows, indent=1))
    return 0 if all(str(r["result"]).startswith("PASS") for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixtures", nargs="*", help="NAME=REF[@RECIPE]")
    ap.add_argument("--smoke", action="store_true", help="run the chroot smoke probe (root)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--corpus",
        action="store_true",
        help="the compatibility corpus table (FIXTURES are app names, default all)",
    )
    a = ap.parse_args()
    if a.corpus:
        return corpus_table(a.fixtures, a.json)
    todo = []
    if a.fixtures:
        for spec in a.fixtures:
            name, _, ref = spec.partition("=")
            ref, _, rec = ref.partition("@")
            todo.append((name, ref, rec or name))
    else:
        for name, (d, tag, rec) in DEFAULT.items():
            if (FIXTURES / d).is_dir():
                todo.append((name, f"oci:{FIXTURES / d}:{tag}", rec))
            else:
                print(
                    f"skip {name}: no {FIXTURES / d} (build it with tests/fixtures/build-*-oci.sh)",
                    file=sys.stderr,
                )
    rows = [bench_one(n, r, rec, a.smoke) for n, r, rec in todo]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    hdr = (
        f"{'fixture':15} {'source':>10} {'zstd-19':>10} {'lz4':>10} {'cpio':>10} {'ratio':>6} "
        f"{'min s':>6} {'build s':>8}"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['fixture']:15} {r['source_bytes']:>10} {r['initrd_zstd']:>10} {r['initrd_lz4']:>10} "
            f"{r['initrd_none']:>10} {r['ratio']:>5}x {r['minimize_s']:>6} {r['build_s']:>8}"
            + (f"  {r['smoke']}" if "smoke" in r else "")
        )
    return 0 if all(str(r.get("smoke", "PASS")).startswith("PASS") for r in rows) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
