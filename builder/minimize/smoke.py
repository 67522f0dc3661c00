"""`python -m builder.minimize.smoke SPEC`: the recipe's network smoke test as a program of its own.

The probe (probe.py, `_smoke_in_netns`) runs it with nsenter inside the sandbox's network namespace, where
the entrypoint listens on `lo`. SPEC is JSON: {"name": recipe name, "smoke": the recipe's Smoke as a dict
with `send` in hex, "seconds": the deadline from now}. It prints one JSON line, [ok, message], the
result of recipes.smoke_test.
"""

from __future__ import annotations

import json
import sys
import time

from ..recipes import Recipe, Smoke, smoke_test


def main(arg: str) -> None:
    """Run the smoke test SPEC (module doc) and print its [ok, message] line."""
    spec = json.loads(arg)
    s = dict(spec["smoke"], send=bytes.fromhex(spec["smoke"]["send"]))
    rec = Recipe(spec["name"], smoke=Smoke(**s))
    ok, msg = smoke_test(rec, b"", {s["port"]: s["port"]}, deadline=time.monotonic() + spec["seconds"])
    print(json.dumps([ok, msg]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
