"""The estimator interface every stage speaks, plus the input checks they share.

A stage is shaped like a scikit-learn estimator:

* hyperparameters are keyword arguments of ``__init__``, stored unchanged under the same names;
* ``fit(...)`` learns and returns ``self``; what it learned lives in attributes ending in ``_``;
* ``decision_function(X)`` gives per-class scores (logits), ``predict_proba(X)`` probabilities and
  ``predict(X)`` the arg-max class; all refuse to run before ``fit`` with :class:`NotFittedError`;
* ``save(path)`` / ``Stage.load(path)`` write and read a fitted stage as one ``.npz`` file of plain arrays
  (read back with ``allow_pickle=False``) whose ``__meta__`` entry is a JSON document (class name,
  hyperparameters, scalar learned state). No pickled objects.

Subclasses register themselves by class name, so ``Stage.load`` can rebuild any stage; adding a stage is
one new file that subclasses :class:`Stage` and touches no other stage.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

_REGISTRY: dict[str, type["Stage"]] = {}


class NotFittedError(ValueError):
    """A stage was asked to predict before ``fit``."""


def softmax(z: np.ndarray, axis: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable softmax (in place when ``out is z``)."""
    out = np.subtract(z, z.max(axis=axis, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def check_features(X, name: str = "X", dim: int | None = None, normalised: bool = True,
                   tol: float = 1e-2, min_rows: int = 1) -> np.ndarray:
    """Validate a feature matrix and return it as C-contiguous float32 [N, D].

    Raises ValueError naming ``name`` when it is not 2-D, has the wrong width, holds NaN/inf, has fewer
    than ``min_rows`` rows, or (``normalised=True``) has rows whose L2 norm differs from 1 by more than
    ``tol``.
    """
    X = np.asarray(X)
    if X.ndim == 1 and dim is not None and X.shape[0] == dim:
        raise ValueError(f"{name}: expected a 2-D array [N, {dim}], got a single vector; "
                         f"use X[None, :] for one row")
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {X.shape}")
    if X.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} row(s), got {X.shape[0]}")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"{name}: feature dimension {X.shape[1]} does not match the expected {dim}")
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point features, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.all(np.isfinite(X)):
        bad = np.flatnonzero(~np.all(np.isfinite(X), axis=1))
        raise ValueError(f"{name}: {bad.size} row(s) contain NaN or inf (first: row {bad[0]})")
    if normalised and X.shape[0]:
        norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
        off = np.abs(norms - 1.0) > tol
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise ValueError(f"{name}: {int(off.sum())} row(s) are not L2-normalised (row {i} has norm "
                             f"{norms[i]:.4f}); normalise features with x / ||x|| first")
    return X


def check_labels(y, n_rows: int, n_classes: int, name: str = "y", require_all: bool = True) -> np.ndarray:
    """Validate integer labels in 0..n_classes-1 (one per row); optionally every class present."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise ValueError(f"{name}: expected {n_rows} labels (one per feature row), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"{name}: labels must be integers")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name}: labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    if require_all:
        missing = np.setdiff1d(np.arange(n_classes), y)
        if missing.size:
            raise ValueError(f"{name}: {missing.size} class(es) have no support rows (first: class "
                             f"{missing[0]}); every class given to this stage needs at least one")
    return y


class Stage:
    """Base class of all stages (see the module docstring for the contract)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # -- hyperparameters --------------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "Stage":
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"{type(self).__name__} has no hyperparameter {key!r} "
                                 f"(valid: {sorted(valid)})")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitted state -----------------------------------------------------------------------------------
    def _fitted_names(self) -> list[str]:
        return sorted(k for k in vars(self) if k.endswith("_") and not k.startswith("_"))

    @property
    def is_fitted(self) -> bool:
        return bool(self._fitted_names())

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(...) first")

    # -- scores -----------------------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        return softmax(np.asarray(self.decision_function(X), dtype=np.float64))

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.decision_function(X), axis=1)

    # -- persistence ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, json-able meta) describing the hyperparameters and the fitted state."""
        self._check_fitted()
        arrays, scalars = {}, {}
        for name in self._fitted_names():
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                arrays[name] = value
            elif isinstance(value, (np.integer, np.floating)):
                scalars[name] = value.item()
            else:
                scalars[name] = value
        params = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.get_params().items()}
        return arrays, {"class": type(self).__name__, "params": params, "state": scalars}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "Stage":
        name = meta.get("class")
        if name not in _REGISTRY:
            raise ValueError(f"unknown stage class {name!r} (known: {sorted(_REGISTRY)})")
        klass = _REGISTRY[name]
        if cls is not Stage and not issubclass(klass, cls):
            raise ValueError(f"saved stage is a {name}, not a {cls.__name__}")
        if klass is not cls and "from_state" in vars(klass):  # a stage with its own layout reads it itself
            return klass.from_state(arrays, meta)
        obj = klass(**meta.get("params", {}))
        for key, value in meta.get("state", {}).items():
            setattr(obj, key, value)
        for key, value in arrays.items():
            setattr(obj, key, value)
        return obj

    def save(self, path) -> Path:
        """Write the fitted stage to ``path`` (.npz, atomically). Returns the path."""
        arrays, meta = self.state_dict()
        return save_npz_json(path, arrays, meta)

    @classmethod
    def load(cls, path) -> "Stage":
        arrays, meta = load_npz_json(path)
        return cls.from_state(arrays, meta)


def save_npz_json(path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write ``arrays`` plus a JSON ``meta`` document into one .npz file."""
    path = Path(path)
    if "__meta__" in arrays:
        raise ValueError("'__meta__' is reserved")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in payload.items():
        if v.dtype == object:
            raise ValueError(f"{path}: array {k!r} has dtype object, which cannot be saved without pickle")
    payload["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    from ..output import atomic_open

    with atomic_open(path, "wb") as fh:
        np.savez(fh, **payload)
    return path


def read_npz(path, what: str = "file") -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read without pickle; errors name the file and say it is not a readable
    ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile / format errors, object arrays
        raise ValueError(f"{path}: not a readable {what} ({exc})") from exc


def load_npz_json(path) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    arrays = read_npz(path, "stage file")
    if "__meta__" not in arrays:
        raise ValueError(f"{path}: missing the '__meta__' entry; not a file written by cascade")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt '__meta__' JSON ({exc})") from exc
    return arrays, meta
