"""Resumable SBC runner on Dask: per-simulation seeds, one atomic file per simulation, a
manifest that refuses to mix designs, and the loader of the stored simulations.

Simulation i uses ``np.random.SeedSequence(base_seed, spawn_key=(i,))`` (identical to
``SeedSequence(base_seed).spawn(n)[i]``), so its result depends only on (base_seed, i) — and
on the batch composition for batched tasks, which is a fixed chunking of the indices, never
on scheduling. Every finished simulation is written atomically (``pln_ref.io.atomic_savez``)
to ``out/sims/sim_{i:06d}.npz``; a rerun skips the files that exist and loses nothing.

On Dask the WORKERS write these files, so every worker must see the output directory at the same
path as this process (one machine, or a shared filesystem such as NFS). ``run_sbc`` therefore
ships the absolute path (a relative ``--out`` would resolve against each worker's own working
directory) and, before any simulation, runs a probe on every worker: it reads a file written here
and writes one that is read back here. A cluster without a shared filesystem is refused with
:class:`SharedStorageError` naming the workers that failed, instead of losing every result.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..io import atomic_savez, atomic_write_json, jsonable

__all__ = ["sim_seed", "sim_path", "run_sbc", "load_sims", "SharedStorageError", "check_workers_share"]


class SharedStorageError(ValueError):
    """Dask workers cannot write to / read from the run's output directory (no shared filesystem)."""


_PROBE_DIR = ".worker_probe"


def _probe_worker(out_dir: str, client_file: str, client_token: str, name: str) -> dict:
    """Worker side of the storage probe: read the client's file, write one back (atomically)."""
    import platform

    res = {"host": platform.node(), "cwd": os.getcwd(), "pid": os.getpid(), "error": None}
    probe = Path(out_dir) / _PROBE_DIR
    try:
        seen = (probe / client_file).read_text()
        if seen != client_token:
            raise OSError(f"{probe / client_file} holds another run's token")
        probe.mkdir(parents=True, exist_ok=True)
        from ..io import atomic_write_text

        atomic_write_text(probe / name, client_token + "\n" + res["host"])
    except OSError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def check_workers_share(client, out_dir: str | os.PathLike) -> int:
    """Check that every worker of ``client`` can read from and write to ``out_dir`` as seen by this
    process (module docstring); returns the number of workers checked. Raises
    :class:`SharedStorageError` naming each worker that cannot, or when there are no workers."""
    out = Path(out_dir)
    probe = out / _PROBE_DIR
    probe.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    cfile = f"client-{os.getpid()}-{token}"
    (probe / cfile).write_text(token)
    names = {}
    try:
        workers = list(client.scheduler_info().get("workers", {}))
        if not workers:
            raise SharedStorageError("the Dask scheduler has no workers: start some (dask worker ADDRESS) "
                                     "or leave out --scheduler-address to use a local cluster")
        results = {}
        for w in workers:  # one call per worker: each writes its own file name
            names[w] = f"worker-{secrets.token_hex(6)}"
            results.update(client.run(_probe_worker, str(out), cfile, token, names[w], workers=[w]))
        bad = []
        for w, r in results.items():
            back = probe / names[w]
            if r["error"] is None and not (back.exists() and back.read_text().split("\n")[0] == token):
                r["error"] = f"its file {back} is not visible here"
            if r["error"]:
                bad.append(f"{w} (host {r['host']}, cwd {r['cwd']}): {r['error']}")
        if bad:
            raise SharedStorageError(
                f"{len(bad)} of {len(results)} Dask worker(s) cannot share the output directory {out} with "
                f"this process: {'; '.join(bad)}. The workers write each simulation into it, so it must be "
                "the same directory for all of them: run the workers on this machine or put --out on a "
                "filesystem they all mount at the same path (e.g. NFS), or drop --scheduler-address "
                "to use a local cluster")
        return len(results)
    finally:
        for f in [cfile, *names.values()]:
            try:
                (probe / f).unlink()
            except OSError:
                pass
        try:
            probe.rmdir()
        except OSError:
            pass


class _DropNannyKill(logging.Filter):
    """Drops distributed.nanny's "Worker process still alive after ... seconds, killing": issued
    when a cluster started by ``run_sbc`` is closed after every result has been written, while a
    worker process is still tearing down (harmless; nothing is lost)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("still alive after" in msg and "killing" in msg)


@contextmanager
def _quiet_nanny_kill():
    log = logging.getLogger("distributed.nanny")
    flt = _DropNannyKill()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def sim_seed(base_seed: int, i: int) -> np.random.SeedSequence:
    """Seed of simulation i: SeedSequence(base_seed).spawn(...)[i], independent of scheduling."""
    return np.random.SeedSequence(int(base_seed), spawn_key=(int(i),))


def sim_path(out_dir: str | os.PathLike, i: int) -> Path:
    """File of simulation i: out_dir/sims/sim_{i:06d}.npz."""
    return Path(out_dir) / "sims" / f"sim_{i:06d}.npz"


def _run_batch(task: Callable, indices: list[int], base_seed: int, out_dir: str, config: dict) -> list[int]:
    """Worker side: run one batch, write each missing simulation's file; returns indices written."""
    todo = [i for i in indices if not sim_path(out_dir, i).exists()]
    if not todo:
        return []
    seeds = [sim_seed(base_seed, i) for i in indices]
    t0 = time.perf_counter()
    results = task(list(indices), seeds, config)
    dt = (time.perf_counter() - t0) / max(len(indices), 1)
    if len(results) != len(indices):
        raise RuntimeError(f"task returned {len(results)} results for {len(indices)} simulations")
    written = []
    for i, res in zip(indices, results):
        if i not in todo:
            continue
        arrays = {k: np.asarray(v) for k, v in res.items()}
        arrays["_index"] = np.asarray(i)
        arrays["_seconds"] = np.asarray(dt)
        atomic_savez(sim_path(out_dir, i), arrays)
        written.append(i)
    return written


def _batches(todo_idx: Sequence[int], batch_size: int, n_sims: int) -> list[list[int]]:
    """Fixed chunking [b*B, (b+1)*B) of all indices, keeping batches with any missing sim."""
    todo = set(todo_idx)
    out = []
    for b0 in range(0, n_sims, batch_size):
        idx = list(range(b0, min(b0 + batch_size, n_sims)))
        if any(i in todo for i in idx):
            out.append(idx)
    return out


# tasks recorded under the module they lived in before pln_ref.validation existed
_LEGACY_TASK_MODULES = {"pln_ref.sbc.": "pln_ref.validation.sbc_tasks."}


def _short(value, width: int = 40) -> str:
    """A setting's value for a message: as is when short, else its start and length (arrays are
    recorded as their repr, which can be kilobytes long)."""
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) <= width:
        return text
    flat = " ".join(text.split())
    return f"{flat[:width - 12]}... ({len(text)} chars)"


def _manifest_differences(old: dict, new: dict) -> list[str]:
    """The settings in which a recorded manifest and this run differ, as "name: old -> new"
    (config entries one by one, as "config.name"); empty if they agree."""
    diffs = []
    for k in ("base_seed", "batch_size", "task"):
        if k in old and old[k] != new[k]:
            diffs.append(f"{k}: {_short(old[k])} -> {_short(new[k])}")
    if "config" in old and old["config"] != new["config"]:
        oc, nc = old["config"], new["config"]
        for k in sorted(set(oc) | set(nc)):
            if oc.get(k, "<unset>") != nc.get(k, "<unset>"):
                a = "<unset>" if k not in oc else _short(oc[k])
                b = "<unset>" if k not in nc else _short(nc[k])
                diffs.append(f"config.{k}: {a} -> {b}" + (" (array differs)" if a == b else ""))
    return diffs


def _write_manifest(out: Path, manifest: dict, n_sims: int) -> None:
    """Record the run's design in out/manifest.json; refuse a directory that holds another design.

    The recorded n_sims is the largest ever requested (a resumed run may ask for fewer)."""
    mpath = out / "manifest.json"
    manifest = jsonable(manifest)
    old = json.loads(mpath.read_text()) if mpath.exists() else {}
    for before, now in _LEGACY_TASK_MODULES.items():
        if str(old.get("task", "")).startswith(before):
            old["task"] = now + old["task"][len(before):]
    diffs = _manifest_differences(old, manifest)
    if diffs:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diffs)}); resume with the "
                         "same settings or use another --out directory")
    manifest["n_sims"] = max(int(n_sims), int(old.get("n_sims", 0)))
    atomic_write_json(mpath, manifest)


def _run_synchronous(task: Callable, batches: list[list[int]], base_seed: int, out: Path, config: dict,
                     on_written: Callable[[int], None]) -> None:
    """Run the batches one after the other in this process."""
    for idx in batches:
        on_written(len(_run_batch(task, idx, base_seed, str(out), config)))


def _run_distributed(task: Callable, batches: list[list[int]], base_seed: int, out: Path, config: dict,
                     on_written: Callable[[int], None], *, client=None, scheduler_address: str | None = None,
                     n_workers: int = 2, threads_per_worker: int = 1) -> None:
    """Run the batches on Dask: the given client, a scheduler at ``scheduler_address``, or a
    LocalCluster of worker processes started (and closed) here."""
    from dask.distributed import Client, LocalCluster, as_completed

    own_cluster = own_client = None
    if client is None:
        if scheduler_address:
            from ..dask_client import connect

            client = own_client = connect(scheduler_address)[0]
        else:
            own_cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                       processes=True, dashboard_address=":0")
            client = own_client = Client(own_cluster)
    try:
        check_workers_share(client, out)
        futs = [client.submit(_run_batch, task, idx, base_seed, str(out), config,
                              pure=False, key=f"sbc-{out.name}-{idx[0]:06d}-{os.getpid()}")
                for idx in batches]
        for fut in as_completed(futs):
            on_written(len(fut.result()))
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()


def run_sbc(task: Callable, n_sims: int, out_dir: str | os.PathLike, *, base_seed: int = 0,
            config: dict | None = None, batch_size: int = 1, scheduler: str = "distributed",
            scheduler_address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1,
            progress: bool = True, client=None) -> dict:
    """Run (or resume) an SBC: simulations 0..n_sims-1, each stored in out_dir/sims/.

    task(indices, seeds, config) -> list of {name: array} (one dict per simulation, ranks as
    ints, plus anything else worth keeping); must be an importable module-level function
    (it is shipped to Dask workers; build Stan models inside it, never pickle them).
    scheduler: "distributed" (LocalCluster(n_workers, threads_per_worker) unless
    ``scheduler_address`` or ``client`` is given) or "synchronous" (in-process, for tests).
    ``out_dir`` is made absolute here; on Dask every worker is first checked to share it
    (:func:`check_workers_share`, module docstring).
    A manifest (base_seed, batch_size, task, config) guards against mixing incompatible runs:
    resuming with another config raises; config keys starting with "_" are execution-only
    (logging, sleeps) and are neither guarded nor recorded.
    Returns {"n_done", "n_run_now", "seconds"}.
    """
    if scheduler not in ("distributed", "synchronous"):
        raise ValueError(f"scheduler must be 'distributed' or 'synchronous', got {scheduler!r}")
    out = Path(out_dir).resolve()  # absolute: Dask workers may run in other working directories
    (out / "sims").mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    task_name = f"{getattr(task, '__module__', '?')}.{getattr(task, '__qualname__', repr(task))}"
    recorded = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in config.items() if not str(k).startswith("_")}
    _write_manifest(out, {"base_seed": int(base_seed), "batch_size": int(batch_size), "task": task_name,
                          "config": recorded}, n_sims)
    done = {i for i in range(n_sims) if sim_path(out, i).exists()}
    batches = _batches([i for i in range(n_sims) if i not in done], batch_size, n_sims)
    t0 = time.perf_counter()
    n_written = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_sims, initial=len(done), desc=f"SBC {out.name}", unit="sim")

    def on_written(n: int) -> None:
        nonlocal n_written
        n_written += n
        if bar is not None:
            bar.update(n)

    try:
        if scheduler == "synchronous":
            _run_synchronous(task, batches, base_seed, out, config, on_written)
        else:
            with _quiet_nanny_kill():
                _run_distributed(task, batches, base_seed, out, config, on_written, client=client,
                                 scheduler_address=scheduler_address, n_workers=n_workers,
                                 threads_per_worker=threads_per_worker)
    finally:
        if bar is not None:
            bar.close()
    n_done = sum(sim_path(out, i).exists() for i in range(n_sims))
    return {"n_done": int(n_done), "n_run_now": int(n_written), "seconds": time.perf_counter() - t0}


def load_sims(out_dir: str | os.PathLike, n_sims: int | None = None) -> dict[str, np.ndarray]:
    """Stack the stored simulations: {name: (n_done, ...)} in index order (plus "_index")."""
    files = sorted((Path(out_dir) / "sims").glob("sim_*.npz"))
    if n_sims is not None:
        files = [f for f in files if int(f.stem[4:]) < n_sims]
    if not files:
        raise ValueError(f"no finished simulations in {out_dir}/sims")
    rows = []
    for f in files:
        with np.load(f) as z:
            rows.append({k: z[k] for k in z.files})
    keys = rows[0].keys()
    return {k: np.stack([r[k] for r in rows]) for k in keys}
