"""`--cache REPO`: a registry repository as the build cache a fleet of runners shares, and the record of where
each product of a build came from (built, the local cache, the registry cache) and how long it took.

Products and their entries in REPO (REGISTRY/REPOSITORY, no tag), one tag per key:

    kernel    REPO:kernel-<key>    builder/kernel.py build_key (source, fragments, toolchain); a kernel
                                   artifact as `xbuild kernel push` makes it (publish.push_kernel)
    init      REPO:init-<key>      builder/init.py key (arch, source, compiler, flags); an init artifact
                                   (publish.push_init)
    artifact  REPO:artifact-<key>  builder/inputs.py BuildInputs.key (every input of the artifact); the VM
                                   artifact as `xbuild push` makes it (publish.push)

Why tags: a key is a hash of the inputs, not of the content, so the content-addressed names a registry has
(digests) cannot be looked up by it; a tag is the one name every registry resolves (one HEAD), that a push
sets atomically (the manifest PUT comes after every blob) and that needs no API beyond distribution's (the
referrers API, which could hang entries off a subject, is missing from many registries, the test registry
among them). BuildKit's registry cache is a tag for the same reasons. A key is 64 hex digits, so
`artifact-<key>` (73 characters) fits the 128 a tag may have.

Reading: before a product is built its local cache entry is used if good; else, with a registry, the tag is
pulled through the existing pull path (publish.pull_kernel, pull_init, pull): every manifest and blob
digest-verified, blobs through the blob cache, the kernel (in `kernels/oci-<digest>/`, never standing in for
a local build) checked to be a bootable kernel and removed again when it is not, the init checked to be a
static x86-64 ELF, the artifact validated (open_artifact) before it is renamed into place. An entry that is
missing, unreachable or corrupt in any way is one notice line (`cache: …; building it`) and the product is
built; after one unreachable answer the registry is not asked again in this build. A local disk that is full
is still a failure (NoSpaceError). Since everything lands in the content-addressed blob cache only after its
digest matched, a pulled artifact only after it was validated and a pulled kernel that does not verify is
removed, a bad entry does not poison the local cache.

Writing: a product built is pushed to its tag; so is a product found in the local cache whose tag the
registry lacks (one HEAD), so a runner that built it before it used the cache warms the cache. A registry
that refuses the push (401/403: no push rights) makes the cache read-only for the rest of the build, said
once; any other failed push is a notice too, never a failure of the build. Two runners building the same
key at once both build and both push: blobs are content-addressed and the tag's PUT is atomic, so the tag
ends on one of the two complete manifests (for the reproducible init and artifact the same one).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .cache import cache_dir, remove_entry
from .errors import (
    CacheError,
    KernelError,
    NoSpaceError,
    PackError,
    PublishError,
    RegistryUnavailable,
    XbuildError,
)
from .options import Say
from .reference import ImageRef, parse

if TYPE_CHECKING:
    from .artifact import Artifact
    from .kernel import Kernel

T = TypeVar("T")
ENV = "XBUILD_CACHE_REPO"


class Origin(StrEnum):
    """Where a product of a build came from."""

    BUILT = "built"
    LOCAL = "local cache"
    REGISTRY = "registry cache"


@dataclass(frozen=True)
class Product:
    """One product of a build (`kernel`, `init`, `artifact`): where it came from, its key, the seconds it
    took (pulling or building, not pushing), and the registry entry pulled or pushed (`REPO:TAG@DIGEST`)."""

    name: str
    origin: Origin
    seconds: float
    key: str | None = None
    pulled: str | None = None
    pushed: str | None = None

    def line(self) -> str:
        key = f" {self.key[:12]}" if self.key else ""
        where = f", pushed to {self.pushed}" if self.pushed else f" ({self.pulled})" if self.pulled else ""
        return f"{self.name}{key}: {self.origin} in {self.seconds:.1f} s{where}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "origin": self.origin.value,
            "seconds": round(self.seconds, 3),
            "key": self.key,
            "pulled": self.pulled,
            "pushed": self.pushed,
        }


class BuildCache:
    """The registry cache of one build (`repo` None: none, only the local cache) and its product records.

    `obtain` gets a kernel or init (local entry, else registry entry, else built and pushed); the artifact's
    lookup (`pull`) and push (`push`, after it was verified) are separate calls of the build and the CLI."""

    def __init__(self, repo: str | None, insecure: bool = False, log: Say = lambda msg: None):
        self.repo: ImageRef | None = None
        if repo:
            ref = parse("docker://" + repo.removeprefix("docker://").removeprefix("oci://"))
            if not ref.registry or not ref.repository or ref.digest or repo.rpartition("/")[2].count(":"):
                raise PublishError(f"--cache {repo}: expected REGISTRY/REPOSITORY (no tag or digest)")
            self.repo = ref
        self.insecure, self.log = insecure, log
        self.products: list[Product] = []
        self._off: str | None = None  # why the registry is no longer asked (unreachable)
        self._read_only = False

    @property
    def enabled(self) -> bool:
        return self.repo is not None

    def ref(self, name: str, key: str) -> str:
        """`REGISTRY/REPOSITORY:<name>-<key>`, the entry of product `name` with `key`."""
        assert self.repo is not None
        return f"{self.repo.registry}/{self.repo.repository}:{name}-{key}"

    def record(self, product: Product) -> None:
        self.products.append(product)

    def obtain(
        self,
        name: str,
        key: str,
        local: Callable[[], T | None],
        pull: Callable[[str], tuple[T, str]],
        build: Callable[[], T],
        push: Callable[[T, str], str],
    ) -> T:
        """The product `name` with `key`: `local()` (None: not in the local cache), else `pull(ref)` from the
        registry (value, its `ref@digest`), else `build()` and then `push(value, ref)` (returns `ref@digest`);
        recorded with its origin and time."""
        start = time.monotonic()
        value = local()
        if value is not None:
            seconds = time.monotonic() - start
            pushed = self.push(name, key, push, value) if self._missing(name, key) else None
            self.record(Product(name, Origin.LOCAL, seconds, key, pushed=pushed))
            return value
        got = self.pull(name, key, pull)
        if got is not None:
            self.record(Product(name, Origin.REGISTRY, time.monotonic() - start, key, pulled=got[1]))
            return got[0]
        start = time.monotonic()
        value = build()
        seconds = time.monotonic() - start
        self.record(Product(name, Origin.BUILT, seconds, key, pushed=self.push(name, key, push, value)))
        return value

    def pull(self, name: str, key: str, pull: Callable[[str], tuple[T, str]]) -> tuple[T, str] | None:
        """`pull(ref)` of the entry for `name`/`key`, or None (no registry, or a notice said why not)."""
        if self.repo is None or self._off:
            return None
        ref = self.ref(name, key)
        try:
            return pull(ref)
        except NoSpaceError:
            raise
        except XbuildError as e:  # missing, unreachable or corrupt: the product is built instead
            self._failed(e, f"cache: {_first(e, ref)}; building the {name}")
            return None

    def _missing(self, name: str, key: str) -> bool:
        """Whether the registry lacks the entry (a local product is pushed then: a runner that built it before
        it used the cache warms the cache with it); False when there is no registry or it cannot say."""
        if self.repo is None or self._off or self._read_only:
            return False
        from .publish import exists

        ref = self.ref(name, key)
        try:
            return not exists(ref, self.insecure)
        except NoSpaceError:
            raise
        except XbuildError as e:
            self._failed(e, f"cache: {_first(e, ref)}")
            return False

    def push(self, name: str, key: str, push: Callable[[T, str], str], value: T) -> str | None:
        """`push(value, ref)` to the entry for `name`/`key`; its `ref@digest`, or None (no registry, read-only
        or unreachable, or a notice said why the push failed)."""
        if self.repo is None or self._off or self._read_only:
            return None
        ref = self.ref(name, key)
        try:
            return push(value, ref)
        except NoSpaceError:
            raise
        except XbuildError as e:  # the build stands; the cache just does not get it
            if e.denied:
                self._read_only = True
                self.log(f"cache: no push rights to {self.repo.docker_name} ({_first(e, ref)}); read-only")
            else:
                self._failed(e, f"cache: pushing the {name} failed: {_first(e, ref)}")
            return None

    def _failed(self, e: XbuildError, notice: str) -> None:
        """Say `notice`; after an unreachable registry, ask it nothing more in this build."""
        self.log(notice)
        if isinstance(e, RegistryUnavailable):
            self._off = str(e)

    def pulled(self, name: str) -> bool:
        """Whether the product `name` came from the registry cache."""
        return any(p.name == name and p.origin == Origin.REGISTRY for p in self.products)

    def push_artifact(self, art: Artifact, log: Say) -> None:
        """Push the artifact this build made (recorded as built) to its entry; the record names the push."""
        from .publish import push

        for i, p in enumerate(self.products):
            if p.name == "artifact" and p.origin == Origin.BUILT and p.key:
                pushed = self.push(
                    p.name, p.key, lambda a, ref: push(a.path, ref, self.insecure, log).reference, art
                )
                self.products[i] = dataclasses.replace(p, pushed=pushed)

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.products]


def _first(e: XbuildError, ref: str) -> str:
    """The first line of an error, naming `ref` if it does not."""
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return line if ref.split(":", 1)[0] in line else f"{ref}: {line}"


def trimmed_kernel(cache: BuildCache, fragments: tuple[str, ...], arch: str = "amd64") -> Kernel:
    """The trimmed `arch` kernel for `fragments`: the local entry, else the registry's, else built (and
    pushed)."""
    from . import kernel as kern
    from .publish import pull_kernel, push_kernel

    key = kern.build_key(fragments, arch=arch)

    def local() -> Kernel | None:
        try:
            return kern.cached(cache_dir("kernels") / key)
        except CacheError as e:  # removed: pulled or built again
            cache.log(str(e).splitlines()[0])
            return None

    def pull(ref: str) -> tuple[Kernel, str]:
        path = pull_kernel(ref, cache.insecure)
        try:
            kern.verify(path, arch=arch)
        except KernelError as e:  # digest-verified but not a bootable kernel: out of the cache again
            remove_entry(path.parent)
            raise PublishError(f"{ref}: {e}") from None
        got = kern.cached(path.parent)
        if got is None or got.key != key:
            raise PublishError(f"{ref}: holds the kernel of another key ({got.key if got else None})")
        return got, f"{ref.rpartition(':')[0]}@sha256:{path.parent.name.removeprefix('oci-')}"

    def build() -> Kernel:
        cache.log(f"building the kernel ({' '.join(fragments)}) once; it is cached afterwards")
        return kern.build(fragments, arch=arch)

    def push(k: Kernel, ref: str) -> str:
        return push_kernel(k, ref, cache.insecure).reference

    return cache.obtain("kernel", key, local, pull, build, push)


def init_binary(cache: BuildCache, arch: str = "amd64") -> bytes:
    """The guest init for `arch`: the local entry, else the registry's (a static executable for `arch`,
    init.check_binary), else compiled (and pushed)."""
    from . import init
    from .publish import pull_init, push_init

    key = init.key(arch)

    def pull(ref: str) -> tuple[bytes, str]:
        named, data, pulled = pull_init(ref, cache.insecure)
        if named != key:
            raise PublishError(f"{ref}: holds the init of another key ({named[:64]!r})")
        try:
            init.check_binary(data, arch, f"{ref}: init")
        except PackError as e:
            raise PublishError(str(e)) from None
        return data, pulled

    def push(data: bytes, ref: str) -> str:
        return push_init(data, key, ref, cache.insecure).reference

    return cache.obtain("init", key, lambda: init.cached(key), pull, lambda: init.init_binary(arch), push)


def cached_artifact(
    cache: BuildCache, key: str, source_digest: str, out: Path, force: bool
) -> Artifact | None:
    """The artifact of `key` pulled from the registry cache into `out` (validated, renamed into place), or
    None (no registry, or a notice said why not); it must be built from the image `source_digest`."""
    from .artifact import open_artifact
    from .publish import pull

    def fetch(ref: str) -> tuple[Artifact, str]:
        art = open_artifact(pull(ref, out, cache.insecure, force=force))
        if art.manifest.source.manifest_digest != source_digest:
            raise PublishError(
                f"{ref}: holds an artifact of another image ({art.manifest.source.manifest_digest})"
            )
        return art, ref

    start = time.monotonic()
    got = cache.pull("artifact", key, fetch)
    if got is None:
        return None
    cache.record(Product("artifact", Origin.REGISTRY, time.monotonic() - start, key, pulled=got[1]))
    return got[0]
