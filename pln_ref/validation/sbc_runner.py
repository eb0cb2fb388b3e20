"""Resumable SBC runner on Dask: per-simulation seeds, one atomic file per simulation, a
manifest that refuses to mix designs, and the loader of the stored simulations.

Simulation i uses ``np.random.SeedSequence(base_seed, spawn_key=(i,))`` (identical to
``SeedSequence(base_seed).spawn(n)[i]``), so its result depends only on (base_seed, i) — and
on the batch composition for batched tasks, which is a fixed chunking of the indices, never
on scheduling. Every finished simulation is written atomically (``pln_ref.io.atomic_savez``)
to ``out/sims/sim_{i:06d}.npz``; a rerun skips the files that exist and loses nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..io import atomic_savez, atomic_write_json, jsonable

__all__ = ["sim_seed", "sim_path", "run_sbc", "load_sims"]


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
            client = own_client = Client(scheduler_address)
        else:
            own_cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                       processes=True, dashboard_address=":0")
            client = own_client = Client(own_cluster)
    try:
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
    A manifest (base_seed, batch_size, task, config) guards against mixing incompatible runs:
    resuming with another config raises; config keys starting with "_" are execution-only
    (logging, sleeps) and are neither guarded nor recorded.
    Returns {"n_done", "n_run_now", "seconds"}.
    """
    if scheduler not in ("distributed", "synchronous"):
        raise ValueError(f"scheduler must be 'distributed' or 'synchronous', got {scheduler!r}")
    out = Path(out_dir)
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
