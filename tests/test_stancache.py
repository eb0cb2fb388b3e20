"""pln_ref.validation.stancache: compiled Stan products in a per-user cache, built once under a lock."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from pln_ref.validation.stancache import build_dir, cache_root, cached_build

PROGRAM = "parameters { real y; } model { y ~ normal(0, 1); }\n"


def _slow_build(stan_copy: Path, log: str) -> Path:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # long enough that the other process arrives while this one builds
    product = stan_copy.with_suffix(".so")
    product.write_text("built from " + stan_copy.read_text())
    return product


def _worker(program: str, cache: str, log: str, out: str) -> None:
    os.environ["PLN_REF_CACHE_DIR"] = cache
    product = cached_build(Path(program), "fake", "1.0", "/opt/fake", lambda p: _slow_build(p, log))
    Path(out).write_text(str(product))


def test_two_processes_build_once_and_share_the_product(tmp_path):
    prog = tmp_path / "repo" / "toy.stan"
    prog.parent.mkdir()
    prog.write_text(PROGRAM)
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(prog), str(cache), str(log), str(tmp_path / f"out{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1            # one build, not two
    outs = {(tmp_path / f"out{i}").read_text() for i in range(2)}
    assert len(outs) == 1
    product = Path(outs.pop())
    assert product.read_text() == "built from " + PROGRAM and str(product).startswith(str(cache))
    assert sorted(p.name for p in prog.parent.iterdir()) == ["toy.stan"]   # nothing beside the program


def test_cache_key_program_hash_engine_version_and_rebuild_after_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("PLN_REF_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    prog = tmp_path / "toy.stan"
    prog.write_text(PROGRAM)
    calls = []

    def build(p: Path) -> Path:
        calls.append(p)
        out = p.with_suffix(".so")
        out.write_text("x")
        return out

    a = cached_build(prog, "fake", "1.0", "/opt/a", build)
    assert cached_build(prog, "fake", "1.0", "/opt/a", build) == a and len(calls) == 1
    b = cached_build(prog, "fake", "1.1", "/opt/a", build)            # other engine version
    c = cached_build(prog, "fake", "1.0", "/opt/b", build)            # other installation
    assert len({a, b, c}) == 3 and len(calls) == 3
    prog.write_text(PROGRAM + "// edited\n")                          # other program text
    d = cached_build(prog, "fake", "1.0", "/opt/a", build)
    assert d.parent != a.parent and len(calls) == 4
    # a build that died half way (no built.json) is redone, from a clean folder
    folder = build_dir(prog, "fake", "1.0", "/opt/a")
    (folder / "built.json").unlink()
    (folder / "junk.o").write_text("half")
    assert cached_build(prog, "fake", "1.0", "/opt/a", build) == d and len(calls) == 5
    assert not (folder / "junk.o").exists()

    def bad(p: Path) -> Path:
        return tmp_path / "elsewhere.so"

    with pytest.raises(RuntimeError, match="did not produce a file"):
        cached_build(prog, "other", "1.0", "/opt/a", bad)


def test_default_cache_root_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("PLN_REF_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "pln-ref" / "stan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "pln-ref" / "stan"
