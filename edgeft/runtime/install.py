"""Install a bundle archive on the device: unpack safely, verify, then move into place in one rename."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

from ..errors import BundleError, UsageError
from . import atomic
from .bundle import Bundle
from .trust import enforce, load_policy

MAX_ARCHIVE_BYTES = 4 << 30  # 4 GiB unpacked


def install(archive: str | Path, target: str | Path, public_key: str | Path | None = None,
            max_bytes: int | None = None, replace: bool = False) -> Path:
    """Unpack a .tar.gz bundle safely, verify it, and move it into place in one rename."""
    archive, target = Path(archive), Path(target)
    if target.exists() and not replace:
        raise UsageError(f"{target}: already exists; pass --replace to swap the installed bundle.")
    limit = max_bytes or int(load_policy().get("max_archive_mb", 0)) << 20 or MAX_ARCHIVE_BYTES
    try:
        tar = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{archive}: not a readable archive ({e}).") from None
    with tar, tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None,
                                          prefix=f".{target.name}.unpack.") as tmp:
        members, total = [], 0
        for m in tar.getmembers():
            name = m.name
            p = Path(name)
            if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")):
                raise BundleError(f"{archive}: member '{name}' would write outside the target folder.")
            if m.issym() or m.islnk():
                raise BundleError(f"{archive}: member '{name}' is a link; bundles hold regular files only.")
            if not (m.isfile() or m.isdir()):
                raise BundleError(f"{archive}: member '{name}' is a device, FIFO or other special file.")
            total += m.size
            if total > limit:
                raise BundleError(f"{archive}: unpacks to more than {limit >> 20} MB (the limit); refused.")
            members.append(m)
        roots = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
        if len(roots) != 1:
            raise BundleError(f"{archive}: expected one top-level bundle folder, found {len(roots)}.")
        for m in members:  # regular files and folders only, checked above; no owner or mode tricks
            dest = Path(tmp) / m.name
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            with open(dest, "wb") as f:
                shutil.copyfileobj(src, f)
            os.chmod(dest, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        unpacked = Path(tmp) / roots.pop()
        enforce(unpacked, public_key)
        Bundle(unpacked)  # hashes and models load: only a working bundle is installed
        with atomic.directory(target, replace=replace) as final:
            final.rmdir()
            shutil.move(str(unpacked), str(final))
    return target
