"""`xbuild explain ARTIFACT PATH`: why a path is in the minimized guest, or why it is not.

Reads the "minimize" section of the artifact's validated manifest (written from `Report.to_json()`).
"""

from __future__ import annotations

import re
from typing import Any

from .errors import BadInput
from .minimize.report import reason_text


def explain(section: dict[str, Any] | None, path: str) -> str:
    """One paragraph: whether `path` is in the guest and which rule decided it, from the manifest's minimize
    report `section` (Manifest.minimize: untrusted JSON, its shape is checked here)."""
    if not isinstance(section, dict) or not isinstance(section.get("paths"), dict):
        raise BadInput("the artifact's manifest.json has no minimize report (built with an older xbuild?)")
    paths: dict[str, Any] = section["paths"]
    if not all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in paths.values()):
        raise BadInput("the artifact's manifest.json has a malformed minimize report")
    p = "/" + "/".join(c for c in path.split("/") if c and c != ".")
    entry = paths.get(p)
    if entry is None:
        under = [q for q in paths if q.startswith(p.rstrip("/") + "/")]
        if under:
            kept = sum(1 for q in under if paths[q][0] == "kept")
            return (
                f"{p}: a directory (directories are always kept); below it {kept} of {len(under)} "
                f"entries are kept - ask about one of them"
            )
        return f"{p}: not in the source image (or a directory, which is always kept)"
    status, reason, detail = (list(entry) + ["", "", ""])[:3]
    verb = "KEPT" if status == "kept" else "DROPPED"
    out = f"{p}: {verb} ({reason}): {reason_text(reason)}"
    if detail:
        out += f"\n  because: {detail}"
    if status == "dropped":
        out += "\n  to keep it: add it to the recipe's [keep] paths/globs, or build with --minimize none"
    return out


_PATH_HINT = re.compile(rb"(/[\w.+@%=,:~-]+(?:/[\w.+@%=,:~-]+)+)")
_NAME_HINTS = (
    re.compile(rb"error while loading shared libraries: ([^:\s]+)"),
    re.compile(rb"No module named '([\w.]+)'"),
    re.compile(rb"(?:^|\s)([\w.+-]+): (?:command |executable file )?not found"),
    re.compile(rb"can't load library '([^']+)'"),
)
_FAILURE_WORDS = (
    b"No such file",
    b"not found",
    b"cannot open",
    b"can't open",
    b"Cannot open",
    b"failed to open",
    b"could not open",
    b"No module named",
    b"error while loading",
)


def likely_missing(section: dict[str, Any] | None, console: bytes, limit: int = 10) -> list[tuple[str, str]]:
    """Dropped files that a failed guest's console output points at (for verify failures): paths
    and library/module/command names on lines that report a missing file (the shell's and the init's
    "not found", exit 127, "No such file", "cannot open shared object file"…), matched against the
    report's dropped paths. Each item is (path, the reason it was dropped)."""
    paths = (section or {}).get("paths")
    paths = paths if isinstance(paths, dict) else {}
    dropped = {p: v[1] for p, v in paths.items() if isinstance(v, list) and len(v) > 1 and v[0] == "dropped"}
    by_base: dict[str, list[str]] = {}
    for p in dropped:
        by_base.setdefault(p.rsplit("/", 1)[-1], []).append(p)
    found: list[str] = []

    def add(p: str) -> None:
        if p in dropped and p not in found:
            found.append(p)

    for line in console.splitlines():
        if not any(w in line for w in _FAILURE_WORDS):
            continue
        for m in _PATH_HINT.finditer(line):
            add(m.group(1).decode("utf-8", "replace").rstrip(":,."))
        for rx in _NAME_HINTS:
            for m in rx.finditer(line):
                name = m.group(1).decode("utf-8", "replace")
                if "." in name and not name.endswith((".so",)) and ".so." not in name and "/" not in name:
                    mod = name.replace(".", "/")  # a Python module
                    for p in dropped:
                        if p.endswith((f"/{mod}.py", f"/{mod}/__init__.py")) or f"/{mod}." in p:
                            add(p)
                for p in by_base.get(name, []):
                    add(p)
    return [(p, dropped[p]) for p in found[:limit]]
