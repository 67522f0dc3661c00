"""One exception type per stage, all under XbuildError; the CLI catches them once.

`exit_code` 2 means bad input (the user can fix the command or the image), 1 means a failure.
"""


class XbuildError(Exception):
    """Base of every error xbuild reports as one line."""

    exit_code = 1
    denied = False  # a registry refused the request for want of credentials or rights (401/403)


class BadInput(XbuildError):
    """The user's input is at fault: a bad reference, image, option or file."""

    exit_code = 2


class ReferenceError_(BadInput):
    """An image reference that cannot be parsed."""


class SourceError(BadInput):
    """The image cannot be fetched or is not a valid image."""


class RegistryUnavailable(XbuildError):
    """A registry that stays unreachable or keeps failing after retries."""

    exit_code = 2


class FlattenError(BadInput):
    """A layer that is corrupt or tries to escape the root."""


class PackError(XbuildError):
    """The initramfs cannot be written."""


class ConfigError(BadInput):
    """The image config cannot be turned into a guest config (user, entrypoint...)."""


class KernelError(XbuildError):
    """A kernel that cannot be built or does not carry what Xen/QEMU boot needs."""


class RunError(XbuildError):
    """A guest that cannot be started or supervised."""


class ArtifactError(BadInput):
    """An artifact directory that cannot be written or read."""


class MinimizeError(BadInput):
    """The entrypoint or its closure cannot be resolved inside the image (missing file or library)."""


class PublishError(BadInput):
    """A push or pull of an xbuild artifact that the registry refuses or that is not an xbuild artifact."""


class CacheError(XbuildError):
    """A cache entry that is corrupt and cannot be fetched or rebuilt from its source (the file is named)."""


class NoSpaceError(XbuildError):
    """A write that ran out of space (ENOSPC) or quota (EDQUOT); what was being written is removed."""


class DiskError(XbuildError):
    """An ext4 disk image that cannot be written (libguestfs or e2fsprogs failed)."""


class DiskInputError(DiskError, BadInput):
    """A disk image request the user can fix: too small a size, an unwritable path, libguestfs missing."""


class SignatureError(BadInput):
    """A signature that cannot be made or checked: a bad key file, an unsigned image, one no key verifies."""


class RebuildError(BadInput):
    """`xbuild rebuild`: a recorded input that cannot be had here (the source digest gone, the recipe or the
    toolchain changed)."""
