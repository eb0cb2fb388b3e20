"""Build products of compiled Stan engines (CmdStan executables, BridgeStan ``*_model.so``) in a
per-user cache directory, never beside the ``.stan`` files (the repository or ``site-packages``).

Layout::

    <cache root>/<program stem>-<program hash>/<engine>-<engine version>-<install hash>/
        <stem>.stan       a copy of the program, compiled in place by the engine
        <product>         the executable / shared library the engine built
        built.json        written last: the build finished (program hash, engine, version, product)
        .lock             the build lock

* cache root: ``$PLN_REF_CACHE_DIR``, else ``$XDG_CACHE_HOME/pln-ref/stan``, else
  ``~/.cache/pln-ref/stan``;
* program hash: SHA-256 (first 16 hex digits) of the program text, so any edit of the program
  rebuilds it;
* engine version and install hash: the CmdStan / BridgeStan version and the first 8 hex digits of
  the SHA-256 of the installation's resolved path (two installations never share a product; the
  products link against their installation's libraries).

Concurrency: the build runs under an exclusive lock on ``.lock`` (``fcntl.flock``; released by the
OS if the process dies), so of two processes compiling the same program with the same engine one
builds and the other waits and then reuses the product; neither overwrites the other. A build that
died half way has no ``built.json``: the next caller clears the folder and builds again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from ..io import atomic_write_json

__all__ = ["cache_root", "program_hash", "build_dir", "file_lock", "cached_build"]


def cache_root() -> Path:
    """``$PLN_REF_CACHE_DIR``, else ``$XDG_CACHE_HOME/pln-ref/stan``, else ``~/.cache/pln-ref/stan``."""
    explicit = os.environ.get("PLN_REF_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "pln-ref" / "stan"


def program_hash(text: str) -> str:
    """First 16 hex digits of SHA-256(program text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _safe(part: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(part)) or "_"


def build_dir(program: Path, engine: str, version: str, install: str | os.PathLike,
              text: str | None = None) -> Path:
    """Cache folder of ``program`` (its ``text``, read from the file if None) built by ``engine``
    ``version`` from installation ``install``."""
    program = Path(program)
    text = program.read_text() if text is None else text
    tag = hashlib.sha256(str(Path(install).resolve()).encode()).hexdigest()[:8]
    return (cache_root() / f"{_safe(program.stem)}-{program_hash(text)}"
            / f"{_safe(engine)}-{_safe(version)}-{tag}")


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float = 3600.0, poll: float = 0.2) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing) for the ``with`` block.

    POSIX ``flock`` (the OS releases it when the holder dies); waits at most ``timeout`` seconds,
    then TimeoutError naming the lock file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            def acquire() -> bool:
                try:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                    return True
                except OSError:
                    return False

            def release() -> None:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            def acquire() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            def release() -> None:
                fcntl.flock(fd, fcntl.LOCK_UN)

        deadline = time.monotonic() + timeout
        while not acquire():
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not lock {path} within {timeout:.0f} s (another build holds it)")
            time.sleep(poll)
        try:
            yield
        finally:
            release()
    finally:
        os.close(fd)


def cached_build(program: str | os.PathLike, engine: str, version: str, install: str | os.PathLike,
                 build: Callable[[Path], str | os.PathLike]) -> Path:
    """The build product of ``program`` for this engine, building it once into the cache.

    ``build(stan_copy)`` compiles the copy of the program inside the cache folder and returns the
    path of its product (which must lie in that folder). Under the lock: if ``built.json`` is
    there and its product exists, that product is returned without building; otherwise the folder
    is cleared, the program copied in, ``build`` called and ``built.json`` written last.
    """
    program = Path(program)
    text = program.read_text()
    folder = build_dir(program, engine, version, install, text)
    marker = folder / "built.json"
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if marker.is_file():
            try:
                product = folder / json.loads(marker.read_text())["product"]
            except (ValueError, KeyError):
                product = None
            if product is not None and product.is_file():
                return product
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        stan_copy = folder / f"{program.stem}.stan"
        stan_copy.write_text(text)
        product = Path(build(stan_copy)).resolve()
        if product.parent != folder.resolve() or not product.is_file():
            raise RuntimeError(f"{engine} build of {program.name} did not produce a file in {folder}: {product}")
        atomic_write_json(marker, {"program": program.name, "program_hash": program_hash(text),
                                   "engine": engine, "version": version, "install": str(Path(install).resolve()),
                                   "product": product.name, "built_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        return product
