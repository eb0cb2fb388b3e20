"""Stan engines: locate the Stan programs, build BridgeStan models, run NUTS with one interface.

The data dicts of the pln_* programs are in :mod:`pln_ref.validation.standata`.

The Stan programs in ``stan/`` are the source of truth for the densities:

* ``pln_cell``  -- latents (x^(c), eta^(c)) of N cells given fixed globals; its BridgeStan
  ``log_density`` on theta_unc = (x[1], ..., x[N], log eta) (x cell-major, C order) equals
  ``pln_ref.model.log_joint(u, x, eta, params, log_anchor).sum() + sum(log eta)``.
* ``pln_joint`` -- globals (mu, W, d) and all latents, with documented priors
  (see :func:`pln_ref.validation.standata.pln_joint_data`).

:class:`BridgeStanCellGradient` gives ``pln_ref.laplace.newton_map`` the gradient of ``pln_cell``
through BridgeStan (the solver takes a gradient function and never imports this module).

Engines for NUTS (:func:`sample_nuts`), same arguments for all:

* ``"stanli"``    -- stanli (no compiler needed; always available here).
* ``"cmdstanpy"`` -- CmdStan through cmdstanpy; used by default when ``cmdstanpy.cmdstan_path()``
  finds an installation (``$CMDSTAN`` or cmdstanpy's own folder; this module never calls the
  installer).
* ``"pystan"``    -- PyStan 3 (``pip install pystan``), optional cross-check.

Every engine takes the same options with the same meaning: ``warmup=0`` samples without
adaptation (CmdStan gets ``adapt_engaged=False``), inits are constrained values (zero-size
parameters are left out for CmdStan, which rejects ``[]`` for an (0, G) array), and the returned
``InferenceData`` has ``log_lik`` (when the program has it) in ``idata.log_likelihood``, not in
the posterior.

Compiled engines (CmdStan, BridgeStan from ``$BRIDGESTAN``) build into the per-user cache of
:mod:`pln_ref.validation.stancache`, keyed by the program's hash and the engine version, never
beside the ``.stan`` files. Engine chatter (cmdstanpy's INFO lines, BridgeStan's "already
loaded" warning) is off unless ``verbose=True`` or :func:`set_verbose` was called.

PROCESS BOUNDARIES: neither a ``bridgestan.StanModel`` nor a ``stanli.Model`` may be pickled or
sent to another process (no pickling / double free / hung pools).  Callers that use Dask or a
worker pool send the program NAME (or its text) plus the data dict, and call
:func:`bridgestan_model` / :func:`sample_nuts` inside the worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..params import PLNParams

__all__ = [
    "ENGINES",
    "stan_program",
    "bridgestan_model",
    "BridgeStanCellGradient",
    "sample_nuts",
    "default_engine",
    "resolve_engine",
    "engine_version",
    "available_engines",
    "real_stan_engine",
    "pystan_available",
    "set_verbose",
]

ENGINES = ("stanli", "cmdstanpy", "pystan")
_ENGINE_ALIASES = {"stanli": "stanli", "cmdstanpy": "cmdstanpy", "cmdstan": "cmdstanpy", "pystan": "pystan"}

# stanli / CmdStan sampler columns -> ArviZ sample_stats names.
_STAT_NAMES = {
    "lp__": "lp",
    "accept_stat__": "acceptance_rate",
    "stepsize__": "step_size",
    "treedepth__": "tree_depth",
    "n_leapfrog__": "n_steps",
    "divergent__": "diverging",
    "energy__": "energy",
}

# Named dims of the variables of the pln_* programs (others get "<name>_dim_<i>").
_DIMS = {
    "x": ("cell", "gene"),
    "eta": ("cell",),
    "mu": ("gene",),
    "d": ("gene",),
    "W": ("gene", "factor"),
    "W_id": ("gene", "factor"),
    "Sigma": ("gene", "gene_b"),
    "Omega": ("gene", "gene_b"),
    "u_rep": ("cell", "gene"),
}


# --------------------------------------------------------------------------- programs
def _program_dirs() -> list[Path]:
    package = Path(__file__).resolve().parents[1]  # pln_ref/
    # installed wheel: repo stan/ is force-included as pln_ref/stan/; editable/repo: ../stan
    return [package / "stan", package.parent / "stan"]


def stan_program(name: str) -> Path:
    """Path of ``stan/NAME.stan`` (wheel: ``pln_ref/stan/``; repo/editable: ``<repo>/stan/``).

    ``name`` may carry the ``.stan`` suffix.  Unknown name -> ValueError listing what exists.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise ValueError(f"Stan program name must be a bare name like 'pln_cell', got {name!r}")
    stem = name[:-5] if name.endswith(".stan") else name
    for folder in _program_dirs():
        path = folder / f"{stem}.stan"
        if path.is_file():
            return path
    available = sorted({p.stem for folder in _program_dirs() if folder.is_dir() for p in folder.glob("*.stan")})
    raise ValueError(
        f"unknown Stan program {stem!r}: no {stem}.stan in {[str(p) for p in _program_dirs()]}; "
        f"available: {available}"
    )


def _resolve_program(program: str | os.PathLike) -> Path:
    """A program name ('pln_cell') or a path to a .stan file."""
    if isinstance(program, str) and program.endswith(".stan") and "/" not in program and Path(program).is_file():
        return Path(program)
    if isinstance(program, os.PathLike) or (isinstance(program, str) and ("/" in program or os.sep in program)):
        path = Path(program)
        if not path.is_file():
            raise ValueError(f"Stan program file {str(path)!r} does not exist")
        return path
    return stan_program(str(program))


def _stan_json(data: Mapping[str, Any]) -> dict:
    """Stan's JSON data format: arrays as nested lists, booleans as 0/1 integers."""
    out = {}
    for key, val in data.items():
        arr = np.asarray(val)
        if arr.dtype.kind == "b":
            arr = arr.astype(int)
        out[key] = arr.tolist() if arr.ndim else arr.item()
    return out


def _check_data(data: Mapping[str, Any]) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"Stan data must be a dict of name -> value, got {type(data).__name__}")
    return dict(data)


# --------------------------------------------------------------------------- verbosity
_VERBOSE = False


def set_verbose(flag: bool) -> None:
    """Default verbosity of the engines (False: cmdstanpy INFO lines and BridgeStan's "already
    loaded" warning are silenced). A ``verbose=`` argument of a call overrides it."""
    global _VERBOSE
    _VERBOSE = bool(flag)


def _is_verbose(verbose: bool | None) -> bool:
    return _VERBOSE if verbose is None else bool(verbose)


@contextlib.contextmanager
def _cmdstanpy_logging(verbose: bool):
    """cmdstanpy's logger at WARNING (quiet) or INFO (verbose) for the ``with`` block.

    cmdstanpy sets its logger up (level DEBUG, a stream handler) on first use, so that happens
    here first, before the level is changed."""
    try:
        from cmdstanpy.utils import get_logger

        logger = get_logger()
    except ImportError:  # pragma: no cover - other cmdstanpy versions
        logger = logging.getLogger("cmdstanpy")
    old = logger.level
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


# --------------------------------------------------------------------------- BridgeStan
_BS_VERSION_RE = re.compile(r"#define\s+BRIDGESTAN_(MAJOR|MINOR|PATCH)\s+(\d+)")


def _bridgestan_source_version(src: Path) -> str | None:
    """'2.5.0' from ``src/version.hpp`` of a BridgeStan source tree (None if it cannot be read)."""
    try:
        found = dict(_BS_VERSION_RE.findall((src / "src" / "version.hpp").read_text()))
        return f"{found['MAJOR']}.{found['MINOR']}.{found['PATCH']}"
    except (OSError, KeyError):
        return None


def _bridgestan_mismatch_message(lib_version: str | None, client_version: str, src: Path) -> str:
    want = lib_version or "<the version of your BridgeStan tree>"
    return (f"BRIDGESTAN={str(src)!r} is BridgeStan {lib_version or '(unknown version)'} but the Python "
            f"client is bridgestan {client_version}; the client must match the compiled library's "
            f"major.minor version: `pip install bridgestan=={want}` (or, to keep the environment's "
            f"client, `pip install --no-deps --target DIR bridgestan=={want}` and put DIR first on "
            f"PYTHONPATH), or unset BRIDGESTAN to use stanli's built-in BridgeStan")


def _compiled_bridgestan(path: Path, data: Mapping[str, Any], seed: int, src: Path, verbose: bool):
    """A compiled BridgeStan model of ``path`` from the source tree ``src`` (built once into the
    stancache), after checking that the Python client matches the library version."""
    import bridgestan

    from .stancache import cached_build

    if not src.is_dir() or not (src / "Makefile").is_file():
        raise ValueError(f"BRIDGESTAN={str(src)!r} is not a BridgeStan source tree (no Makefile there)")
    lib_version = _bridgestan_source_version(src)
    client = str(getattr(bridgestan, "__version__", "unknown"))
    if lib_version is None or lib_version.split(".")[:2] != client.split(".")[:2]:
        raise ImportError(_bridgestan_mismatch_message(lib_version, client, src))
    bridgestan.set_bridgestan_path(str(src))

    def build(stan_copy: Path) -> Path:
        return Path(bridgestan.compile_model(str(stan_copy)))

    lib = cached_build(path, "bridgestan", lib_version, src, build)
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore", message=r"(?s).*has already been loaded")
        try:
            return bridgestan.StanModel(str(lib), data=json.dumps(_stan_json(data)), seed=int(seed),
                                        warn=verbose)
        except AttributeError as err:  # a C symbol the client needs is missing from the library
            raise ImportError(_bridgestan_mismatch_message(lib_version, client, src) + f" ({err})") from err


def bridgestan_model(program: str | os.PathLike, data: Mapping[str, Any], *, seed: int = 0,
                     verbose: bool | None = None):
    """A ``bridgestan.StanModel`` for ``program`` (name in ``stan/`` or path) and ``data``.

    Default: built in-process by stanli (no compiler, ~0.02 s).  If the environment variable
    ``BRIDGESTAN`` points at a BridgeStan source tree, the program is compiled with it instead
    (Stan C++; the first build of a program takes 1-3 min, the library goes into the per-user
    cache of :mod:`pln_ref.validation.stancache`, later calls reuse it).  The Python client
    ``bridgestan`` must have the library's major.minor version (ImportError saying what to
    install otherwise).  Either way the object is a real ``bridgestan.StanModel``
    (log_density, log_density_gradient, param_constrain, ...).
    The model must stay in the process that built it (see the module docstring).
    """
    path = _resolve_program(program)
    data = _check_data(data)
    src = os.environ.get("BRIDGESTAN")
    if src:
        return _compiled_bridgestan(path, data, seed, Path(src), _is_verbose(verbose))
    import stanli

    return stanli.bridgestan_model(stan_file=str(path), data=_stan_json(data), seed=int(seed))


class BridgeStanCellGradient:
    """Gradient of the ``pln_cell`` log joint through BridgeStan, as a ``newton_map`` gradient.

    Built for N cells (``counts`` (N, G), ``params`` with capture, ``log_anchor`` (N,)); called as
    ``grad(rows, x, eta) -> (g_x (n, G), g_eta (n,))`` with ``rows`` (n,) indices of the cells
    being evaluated, x (n, G) and eta (n,) their values. One BridgeStan model holds all N cells;
    a theta buffer keeps the last values of every cell, the rows are filled in and one
    ``log_density_gradient`` is evaluated (the density is a sum over cells, so row i of the
    gradient depends on cell i only).

    BridgeStan differentiates on the unconstrained scale (x, log eta) with the Jacobian log eta:
    d lp / d log(eta) = g_eta * eta + 1, so g_eta = (grad - 1) / eta. That division loses all
    precision as eta -> 0, so for eta <= 1e-8 the eta component is analytic:
    g_eta = sum lambda - sum u - (eta - m) / sigma_M^2.
    """

    ETA_ANALYTIC = 1e-8

    def __init__(self, counts, params: PLNParams, log_anchor) -> None:
        from .standata import pln_cell_data

        if params.capture is None:
            raise ValueError("the BridgeStan gradient needs capture settings (pln_cell has eta)")
        data = pln_cell_data(counts, params, log_anchor)
        self.model = bridgestan_model("pln_cell", data)
        self.N, self.G = int(data["N"]), int(data["G"])
        self.u = np.asarray(data["u"], dtype=float)
        self.m = params.capture.prior_mean(np.asarray(data["log_L"], dtype=float))
        self.sigma_M = float(params.capture.sigma_M)
        self._x = np.tile(np.asarray(params.mu, dtype=float), (self.N, 1))
        self._log_eta = np.zeros(self.N)

    def __call__(self, rows: np.ndarray, x: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)
        x = np.asarray(x, dtype=float)
        eta = np.asarray(eta, dtype=float).reshape(-1)
        if x.shape != (rows.size, self.G) or eta.shape != (rows.size,):
            raise ValueError(f"need x ({rows.size}, {self.G}) and eta ({rows.size},) for {rows.size} rows, "
                             f"got {x.shape} and {eta.shape}")
        self._x[rows] = x
        self._log_eta[rows] = np.log(np.maximum(eta, 1e-300))
        theta = np.concatenate([self._x.ravel(), self._log_eta])
        _, grad = self.model.log_density_gradient(theta, propto=True, jacobian=True)
        g_x = grad[: self.N * self.G].reshape(self.N, self.G)[rows]
        g_log_eta = grad[self.N * self.G:][rows]
        with np.errstate(over="ignore"):
            lam_sum = np.exp(x - eta[:, None]).sum(axis=1)
        g_eta_analytic = lam_sum - self.u[rows].sum(axis=1) - (eta - self.m[rows]) / self.sigma_M**2
        with np.errstate(divide="ignore", invalid="ignore"):
            g_eta = np.where(eta > self.ETA_ANALYTIC, (g_log_eta - 1.0) / eta, g_eta_analytic)
        return g_x, g_eta


# --------------------------------------------------------------------------- NUTS
def _cmdstan_found() -> bool:
    try:
        import cmdstanpy

        cmdstanpy.cmdstan_path()
        return True
    except Exception:
        return False


def pystan_available() -> bool:
    """True if PyStan 3 is importable.

    Not ``find_spec("stan")``: inside a checkout (or an editable install) the repository's
    ``stan/`` folder of Stan programs is importable as a namespace package called ``stan``.
    PyStan is there iff httpstan is installed and ``stan.build`` exists."""
    if importlib.util.find_spec("httpstan") is None:
        return False
    try:
        import stan
    except Exception:
        return False
    return hasattr(stan, "build")


def default_engine() -> str:
    """'cmdstanpy' if ``cmdstanpy.cmdstan_path()`` finds CmdStan, else 'stanli' (never installs)."""
    return "cmdstanpy" if _cmdstan_found() else "stanli"


def real_stan_engine() -> str | None:
    """The first engine running Stan's own C++ that is available: 'cmdstanpy' (CmdStan found),
    then 'pystan' (PyStan 3 installed); None if neither."""
    if _cmdstan_found():
        return "cmdstanpy"
    if pystan_available():
        return "pystan"
    return None


def available_engines() -> list[str]:
    """Engines usable here, in the order of :data:`ENGINES` (stanli is always available)."""
    return ["stanli"] + (["cmdstanpy"] if _cmdstan_found() else []) + (["pystan"] if pystan_available() else [])


def resolve_engine(engine: str | None) -> str:
    """Canonical engine name: None -> :func:`default_engine`; 'cmdstan' -> 'cmdstanpy';
    ValueError for an unknown name (saying how to get each engine)."""
    if engine is None:
        return default_engine()
    if not isinstance(engine, str) or engine.lower() not in _ENGINE_ALIASES:
        raise ValueError(
            f"unknown engine {engine!r}: choose one of {ENGINES} (or None for the default). "
            "stanli is bundled; cmdstanpy needs CmdStan (`python -m cmdstanpy.install_cmdstan` or "
            "$CMDSTAN); pystan needs `pip install pystan`"
        )
    return _ENGINE_ALIASES[engine.lower()]


def engine_version(engine: str | None) -> str | None:
    """Version of the Stan implementation behind ``engine``: stanli's version, CmdStan's
    ('2.35' as cmdstanpy reports it) or httpstan's (PyStan); None if it is not available."""
    engine = resolve_engine(engine)
    try:
        if engine == "stanli":
            import stanli

            return str(stanli.__version__)
        if engine == "cmdstanpy":
            import cmdstanpy

            cmdstanpy.cmdstan_path()
            v = cmdstanpy.cmdstan_version()
            return ".".join(map(str, v)) if v else "unknown"
        if not pystan_available():
            return None
        import httpstan

        return str(httpstan.__version__)
    except Exception:
        return None


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _normalise_inits(inits, chains: int) -> list[dict] | None:
    """None, one dict of constrained values (all chains), or a list of one dict per chain."""
    if inits is None:
        return None
    if isinstance(inits, Mapping):
        return [dict(inits)] * chains
    if isinstance(inits, Sequence) and all(isinstance(i, Mapping) for i in inits):
        if len(inits) != chains:
            raise ValueError(f"inits has {len(inits)} dicts but chains={chains}")
        return [dict(i) for i in inits]
    raise ValueError("inits must be None, a dict of constrained parameter values, or a list of one dict per chain")


def _dims_for(variables: Mapping[str, tuple], dims: Mapping[str, Sequence[str]] | None):
    """Named dims where the known names are consistent in length, default names otherwise."""
    table = dict(_DIMS)
    if dims:
        table.update({k: tuple(v) for k, v in dims.items()})
    lengths: dict[str, int] = {}
    out: dict[str, list[str]] = {}
    for name, shape in variables.items():
        shape = tuple(shape)
        names = table.get(name)
        ok = names is not None and len(names) == len(shape) and all(
            lengths.get(n, s) == s for n, s in zip(names, shape)
        )
        if not ok:
            names = tuple(f"{name}_dim_{i}" for i in range(len(shape)))
        for n, s in zip(names, shape):
            lengths[n] = s
        out[name] = list(names)
    coords = {n: np.arange(s) for n, s in lengths.items()}
    return out, coords


def _to_inference_data(posterior: dict, stats: dict, attrs: dict, dims=None):
    import arviz as az

    posterior = {k: v for k, v in posterior.items() if v.size > 0}
    shapes = {k: v.shape[2:] for k, v in posterior.items()}
    dim_map, coords = _dims_for(shapes, dims)
    stats = dict(stats)
    if "diverging" in stats:
        stats["diverging"] = np.asarray(stats["diverging"]).astype(bool)
    for key in ("tree_depth", "n_steps"):
        if key in stats:
            stats[key] = np.asarray(stats[key]).astype(np.int64)
    idata = az.from_dict(posterior=posterior, sample_stats=stats, coords=coords, dims=dim_map)
    _set_attrs(idata, attrs)
    return idata


def _set_attrs(idata, attrs: dict) -> None:
    """Run metadata on both idata.posterior.attrs and idata.sample_stats.attrs."""
    idata.posterior.attrs.update(attrs)
    idata.sample_stats.attrs.update(attrs)


def _log_lik_to_group(idata, name: str = "log_lik") -> None:
    """ArviZ convention on every engine: the pointwise log likelihood ``name`` lives in
    ``idata.log_likelihood``, not in the posterior."""
    if name not in idata.posterior:
        return
    ll = idata.posterior[[name]]
    if "log_likelihood" in idata.groups():
        idata.log_likelihood[name] = ll[name]
    else:
        idata.add_groups(log_likelihood=ll)
    attrs = dict(idata.posterior.attrs)
    idata.posterior = idata.posterior.drop_vars(name)
    idata.posterior.attrs.update(attrs)


def _stan_inits_json(init: Mapping[str, Any]) -> dict:
    """Init dict in Stan's JSON format for CmdStan / PyStan: zero-size arrays are LEFT OUT
    (CmdStan rejects ``[]`` for an (0, G) array; a zero-size parameter needs no value)."""
    return _stan_json({k: v for k, v in init.items() if np.asarray(v).size > 0})


def _sample_stanli(path, data, *, chains, warmup, draws, seed, adapt_delta, max_treedepth, inits,
                   dense_metric, dims, verbose):
    import stanli

    model = stanli.Model(stan_file=str(path), data=_stan_json(data), seed=seed)
    init_vec = None
    if inits is not None:
        init_vec = np.array([model.unconstrain({k: np.asarray(v).tolist() for k, v in i.items()}) for i in inits])
    t0 = time.perf_counter()
    fit = model.sample(
        chains=chains, seed=seed, warmup=warmup, samples=draws, delta=adapt_delta, max_depth=max_treedepth,
        inits=init_vec, metric="dense_e" if dense_metric else "diag_e", refresh=0,
        adapt_engaged=warmup > 0,  # warmup 0: no step-size search either, step size 1 as in CmdStan
    )
    wall = time.perf_counter() - t0
    posterior = {name: np.asarray(fit.draws(name)).reshape(chains, draws, *tuple(shape))
                 for name, shape in fit.variables.items()}
    stats = {_STAT_NAMES.get(col, col.rstrip("_")): np.asarray(fit.sampler_stats[:, :, i])
             for i, col in enumerate(stanli.SAMPLER_COLUMNS)}
    attrs = {"engine": "stanli", "engine_version": stanli.__version__, "sampling_time": wall,
             "max_treedepth": max_treedepth, "adapt_delta": adapt_delta, "num_warmup": warmup}
    return _to_inference_data(posterior, stats, attrs, dims)


def _cmdstan_model(path: Path, verbose: bool):
    """A ``cmdstanpy.CmdStanModel`` of ``path`` whose executable is built once into the stancache."""
    import cmdstanpy

    from .stancache import cached_build

    try:
        home = cmdstanpy.cmdstan_path()
    except Exception as err:  # never call the installer from here
        raise ImportError(
            "engine='cmdstanpy' needs a CmdStan installation: run `python -m cmdstanpy.install_cmdstan` "
            "(needs internet access and a C++ toolchain) or set the CMDSTAN environment variable to a "
            "built CmdStan (see the README, 'Using a real CmdStan'); or use engine='stanli'"
        ) from err
    version = engine_version("cmdstanpy") or "unknown"
    with _cmdstanpy_logging(verbose):
        exe = cached_build(path, "cmdstan", version, home,
                           lambda stan_copy: cmdstanpy.CmdStanModel(stan_file=str(stan_copy)).exe_file)
        return cmdstanpy.CmdStanModel(stan_file=str(exe.parent / path.name), exe_file=str(exe)), version


def _sample_cmdstanpy(path, data, *, chains, warmup, draws, seed, adapt_delta, max_treedepth, inits,
                      dense_metric, dims, verbose):
    import arviz as az

    model, version = _cmdstan_model(path, verbose)
    t0 = time.perf_counter()
    with _cmdstanpy_logging(verbose):
        fit = model.sample(
            data=_stan_json(data), chains=chains, iter_warmup=warmup, iter_sampling=draws, seed=seed,
            max_treedepth=max_treedepth, metric="dense_e" if dense_metric else "diag_e",
            # CmdStan refuses adaptation (and so adapt_delta) without warmup; stanli just skips it
            adapt_engaged=warmup > 0, adapt_delta=adapt_delta if warmup > 0 else None,
            inits=[_stan_inits_json(i) for i in inits] if inits is not None else None,
            show_progress=verbose, show_console=False,
        )
    wall = time.perf_counter() - t0
    variables = {name: tuple(v.shape[1:]) for name, v in fit.stan_variables().items()}
    dim_map, coords = _dims_for(variables, dims)
    idata = az.from_cmdstanpy(posterior=fit, coords=coords, dims=dim_map, log_likelihood=False)
    idata.sample_stats["diverging"] = idata.sample_stats["diverging"].astype(bool)
    _set_attrs(idata, {"engine": "cmdstanpy", "engine_version": version, "sampling_time": wall,
                       "max_treedepth": max_treedepth, "adapt_delta": adapt_delta, "num_warmup": warmup})
    return idata


def _sample_pystan(path, data, *, chains, warmup, draws, seed, adapt_delta, max_treedepth, inits,
                   dense_metric, dims, verbose):
    if not pystan_available():
        raise ImportError("engine='pystan' needs PyStan 3: `pip install pystan` (or `pip install pln-ref[pystan]`)")
    import arviz as az
    import stan  # PyStan 3 (checked above: not the repository's stan/ folder)

    if dense_metric:
        raise ValueError("engine='pystan' supports only the diagonal metric (dense_metric=False)")
    post = stan.build(Path(path).read_text(), data=_stan_json(data), random_seed=seed)
    kwargs = dict(num_chains=chains, num_warmup=warmup, num_samples=draws, delta=adapt_delta, max_depth=max_treedepth)
    if warmup == 0:
        kwargs["adapt_engaged"] = False
    if inits is not None:
        kwargs["init"] = [_stan_inits_json(i) for i in inits]
    t0 = time.perf_counter()
    fit = post.sample(**kwargs)
    wall = time.perf_counter() - t0
    variables = {name: tuple(fit[name].shape[:-1]) for name in fit.param_names}
    dim_map, coords = _dims_for(variables, dims)
    idata = az.from_pystan(posterior=fit, posterior_model=post, coords=coords, dims=dim_map)
    ss = idata.sample_stats
    renames = {k: v for k, v in {"divergent": "diverging", "treedepth": "tree_depth", "accept_stat": "acceptance_rate",
                                 "n_leapfrog": "n_steps", "stepsize": "step_size"}.items() if k in ss}
    if renames:
        idata.sample_stats = ss.rename(renames)
    idata.sample_stats["diverging"] = idata.sample_stats["diverging"].astype(bool)
    _set_attrs(idata, {"engine": "pystan", "engine_version": engine_version("pystan"), "sampling_time": wall,
                       "max_treedepth": max_treedepth, "adapt_delta": adapt_delta, "num_warmup": warmup})
    return idata


def sample_nuts(
    program: str | os.PathLike,
    data: Mapping[str, Any],
    *,
    engine: str | None = None,
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 1000,
    seed: int = 0,
    adapt_delta: float = 0.8,
    max_treedepth: int = 10,
    inits: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    dense_metric: bool = False,
    dims: Mapping[str, Sequence[str]] | None = None,
    verbose: bool | None = None,
):
    """NUTS draws of ``program`` (name in ``stan/`` or a path) as an ``arviz.InferenceData``.

    engine: None -> 'cmdstanpy' if CmdStan is installed, else 'stanli'; or 'stanli', 'cmdstanpy'
    ('cmdstan'), 'pystan'.  The same options mean the same on every engine: ``inits`` are
    CONSTRAINED values (one dict for every chain or a list of one dict per chain; zero-size
    parameters may be given as empty arrays), ``warmup=0`` samples with no adaptation.
    The posterior has named dims for the pln_* variables (cell, gene, factor, gene_b);
    ``log_lik`` (if the program has it) is in ``idata.log_likelihood``; ``sample_stats`` uses
    ArviZ names: diverging (bool), tree_depth, acceptance_rate, n_steps, step_size, lp, energy
    -- so ``arviz.summary`` / divergence counts see them.  ``idata.posterior.attrs`` (and
    ``sample_stats.attrs``) hold engine, engine_version, sampling_time (wall seconds of
    sampling), max_treedepth, adapt_delta, num_warmup.  verbose: show the engine's own log
    lines (None: the :func:`set_verbose` default, quiet).
    """
    engine = resolve_engine(engine)
    path = _resolve_program(program)
    data = _check_data(data)
    chains = _positive_int("chains", chains)
    warmup = _positive_int("warmup", warmup, 0)
    draws = _positive_int("draws", draws)
    max_treedepth = _positive_int("max_treedepth", max_treedepth)
    seed = _positive_int("seed", seed, 0)
    if not (0.0 < float(adapt_delta) < 1.0):
        raise ValueError(f"adapt_delta must lie in (0, 1), got {adapt_delta!r}")
    kwargs = dict(chains=chains, warmup=warmup, draws=draws, seed=seed, adapt_delta=float(adapt_delta),
                  max_treedepth=max_treedepth, inits=_normalise_inits(inits, chains),
                  dense_metric=bool(dense_metric), dims=dims, verbose=_is_verbose(verbose))
    runner = {"stanli": _sample_stanli, "cmdstanpy": _sample_cmdstanpy, "pystan": _sample_pystan}[engine]
    idata = runner(path, data, **kwargs)
    _log_lik_to_group(idata)
    return idata
