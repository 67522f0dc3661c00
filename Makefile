# xbuild — set-up and entry points. Each target installs what it needs (apt packages, the venv) and is
# idempotent; run as root on Debian 12 (or with sudo available).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := python3-venv qemu-system-x86 qemu-utils debootstrap umoci docker-registry skopeo \
	musl-tools busybox-static cpio zstd lz4 xz-utils strace bubblewrap apache2-utils openssl docker.io \
	python3-guestfs linux-image-amd64 gosu nodejs \
	linux-source-6.1 build-essential patch bc bison flex libelf-dev libssl-dev dwarves \
	gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm qemu-user-static binfmt-support musl-dev:arm64
export XBUILD_CACHE ?= $(HOME)/.cache/xbuild

.PHONY: fuzz setup apt venv test test-corpus test-fast demo bench lint clean

setup: apt venv

apt: .work/apt.stamp
.work/apt.stamp: Makefile
	@mkdir -p .work
	@# arm64 guests: apt must know arm64 packages (Xen on arm, Debian's arm64 kernels, busybox) for
	@# `apt-get download PKG:arm64`; the one arm64 package installed is musl-dev:arm64 (the arm64 init's libc)
	@dpkg --print-foreign-architectures | grep -qx arm64 || { \
		$$( [ $$(id -u) -eq 0 ] || echo sudo ) dpkg --add-architecture arm64 && \
		$$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get update -qq; }
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# npm (tests/test_sign.py's independent verifier, sigstore-js): Debian's package, unless the nodejs
	@# installed already brings npm (NodeSource's does, and conflicts with Debian's)
	@command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive $$( [ $$(id -u) -eq 0 ] || echo sudo ) \
		apt-get install -y -qq --no-install-recommends npm
	@# foreign debootstrap second stages (arm64 test images) run through binfmt_misc + qemu-user-static
	@update-binfmts --display qemu-aarch64 2>/dev/null | grep -q enabled || \
		$$( [ $$(id -u) -eq 0 ] || echo sudo ) update-binfmts --enable qemu-aarch64
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml Makefile | apt
	/usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# libguestfs' Python binding is Debian's only (not on PyPI): link just it into the venv
	mkdir -p $(VENV)/debian-guestfs
	ln -sf /usr/lib/python3/dist-packages/guestfs.py \
		/usr/lib/python3/dist-packages/libguestfsmod.cpython-311-x86_64-linux-gnu.so $(VENV)/debian-guestfs/
	echo "$(abspath $(VENV))/debian-guestfs" > \
		$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-guestfs.pth
	@touch $@

# Everything: unit tests and the slow ones (boots, kernel build, debootstrap fixtures, registry).
test: setup
	$(PY) -m pytest -q -m 'not corpus' --durations=40; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; exit 0; }; exit $$rc

# The compatibility corpus of real applications (README: "What runs where"; hours cold on 2 cores).
test-corpus: setup
	$(PY) -m pytest -q -m corpus

# The pure parts only, for quick iteration.
test-fast: setup
	$(PY) -m pytest -q -m 'not slow'; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# The main job end to end: nginx look-alike -> local registry -> xbuild -> boot under QEMU -> HTTP GET.
demo: setup
	bash scripts/demo.sh

# Speed and size targets, each measured side by side in one run (see README "Benchmarks").
bench: setup
	$(PY) bench/pack.py
	nice -n 10 $(PY) bench/compression.py --quick
	$(PY) bench/kernel_boot.py
	$(PY) bench/kernel_boot.py --arch arm64
	$(PY) bench/minimize.py
	$(PY) bench/xen_boot.py
	$(PY) bench/warm_rig.py
	$(PY) bench/disk.py
	$(PY) bench/disk_boot.py
	$(PY) bench/hostile.py

# The property tests of tests/test_properties.py with many more examples, for FUZZ_SECONDS (not in `test`):
# rounds of fresh random seeds until the budget is spent; a failure stops it and prints the example.
FUZZ_SECONDS ?= 300
fuzz: venv
	@end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); n=0; \
	while [ $$(date +%s) -lt $$end ]; do n=$$((n + 1)); \
		HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -x -p no:cacheprovider tests/test_properties.py \
			--hypothesis-seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') || exit 1; \
	done; echo "fuzz: $$n rounds in $(FUZZ_SECONDS)s budget, no failure"

lint: venv
	$(VENV)/bin/ruff check builder tests bench
	$(VENV)/bin/ruff format --check builder tests bench
	$(VENV)/bin/mypy builder

clean:
	rm -rf out .work $(VENV)
