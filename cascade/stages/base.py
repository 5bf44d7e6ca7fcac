"""The estimator interface every stage speaks, the registry of stages, and the checks they share.

A stage is shaped like a scikit-learn estimator:

* hyperparameters are keyword arguments of ``__init__``, stored unchanged under the same names, and declared
  as data in ``_parameter_constraints`` (types, intervals, allowed strings); :func:`validate_params` checks
  them, both when the stage fits and when a configuration file is loaded;
* one fit signature for every stage: ``fit(X, y=None, *, text=None, val=None, query=None)`` learns and returns
  ``self``; what it learned lives in attributes ending in ``_`` (numpy arrays or JSON scalars/lists);
* ``decision_function(X)`` gives per-class scores (logits); ``predict_proba``, ``predict_log_proba`` and
  ``predict`` follow from it; all refuse to run before ``fit`` with :class:`NotFittedError`;
* ``state_dict()`` / ``Stage.from_state(...)`` give and rebuild a fitted stage as plain arrays plus a JSON
  document (hyperparameters and scalar learned state); ``save``/``load`` write them as one ``.npz`` file read
  back with ``allow_pickle=False``. No pickled objects.

A stage registers itself once with the :func:`register_stage` decorator under a short name; that name is the
configuration table of its hyperparameters (``[stages.<name>]``) and the name a saved model refers to it by.
The registry is the only list of stage names: adding a stage is one new file that subclasses :class:`Stage`
and carries the decorator (docs/extending.md).
"""
from __future__ import annotations

import inspect
import json
import math
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from ..io import load_npz_json, save_npz_json

_REGISTRY: dict[str, type["Stage"]] = {}        # registered name -> stage class (the only list of names)
_BY_CLASS: dict[str, type["Stage"]] = {}        # class name -> class, to read files that name the class


class NotFittedError(ValueError):
    """A stage was asked to predict before ``fit``."""


class UnknownStageError(ValueError):
    """A stage name that no registered stage has."""


class ParameterError(ValueError):
    """A hyperparameter outside its declared constraints; the message names the key."""


# ------------------------------------------------------------------------------------------------- registry
def register_stage(name: str):
    """Class decorator: register a :class:`Stage` subclass under ``name`` (its ``[stages.<name>]`` table).

    Registering a second, different class under a taken name is an error; registering the same class again
    (a module imported twice) is not."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"stage name {name!r}: use letters, digits, '-' and '_'")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"@register_stage({name!r}) decorates Stage subclasses, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and f"{known.__module__}.{known.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"stage name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        cls.stage_name = name
        _REGISTRY[name] = cls
        _BY_CLASS[cls.__name__] = cls
        return cls

    return decorate


def get_stage(name: str) -> type["Stage"]:
    """The stage class registered under ``name``; :class:`UnknownStageError` naming the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownStageError(f"unknown stage {name!r} (registered: {', '.join(stage_names())})") from None


def stage_names() -> list[str]:
    """The registered stage names, sorted."""
    return sorted(_REGISTRY)


def stage_name(stage) -> str:
    """The registered name of a stage (instance or class), or its class name when it is not registered."""
    cls = stage if isinstance(stage, type) else type(stage)
    name = cls.__dict__.get("stage_name")
    return name if name is not None and _REGISTRY.get(name) is cls else cls.__name__


# ------------------------------------------------------------------------------------ parameter constraints
class Interval:
    """A number of ``kind`` (``Integral`` or ``Real``) between ``left`` and ``right`` (None: unbounded);
    ``closed`` is "both", "left", "right" or "neither". Booleans are not numbers here."""

    def __init__(self, kind, left=None, right=None, closed: str = "both"):
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def __call__(self, value) -> bool:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, self.kind):
            return False
        if isinstance(value, Real) and not math.isfinite(float(value)):
            return False
        lo_ok = self.left is None or (value >= self.left if self.closed in ("both", "left") else value > self.left)
        hi_ok = self.right is None or (value <= self.right if self.closed in ("both", "right")
                                       else value < self.right)
        return bool(lo_ok and hi_ok)

    def __str__(self) -> str:
        what = "an integer" if self.kind is Integral else "a number"
        if self.left is None and self.right is None:
            return what
        if self.right is None:
            return f"{what} {'>=' if self.closed in ('both', 'left') else '>'} {self.left}"
        if self.left is None:
            return f"{what} {'<=' if self.closed in ('both', 'right') else '<'} {self.right}"
        lb = "[" if self.closed in ("both", "left") else "("
        rb = "]" if self.closed in ("both", "right") else ")"
        return f"{what} in {lb}{self.left}, {self.right}{rb}"


class Options:
    """One of a fixed set of values (strings, or ``None``/``False``)."""

    def __init__(self, *values):
        self.values = values

    def __call__(self, value) -> bool:
        return any(value is v or (isinstance(v, str) and isinstance(value, str) and value == v) for v in self.values)

    def __str__(self) -> str:
        return "one of " + ", ".join("none" if v is None else "false" if v is False else repr(v)
                                     for v in self.values)


class TypeOf:
    """An instance of ``types`` (e.g. ``bool``; ``Stage``; ``dict``), described by ``what``."""

    def __init__(self, types, what: str):
        self.types, self.what = types, what

    def __call__(self, value) -> bool:
        if self.types is bool:
            return isinstance(value, (bool, np.bool_))
        return isinstance(value, self.types)

    def __str__(self) -> str:
        return self.what


class ArrayLike:
    """A non-empty list or 1-D array of finite non-negative numbers (e.g. a class marginal)."""

    def __call__(self, value) -> bool:
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, np.ndarray)):
            return False
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return False
        return a.ndim == 1 and a.size > 0 and bool(np.all(np.isfinite(a))) and bool(np.all(a >= 0))

    def __str__(self) -> str:
        return "a list of non-negative numbers"


class WeightTable:
    """A table of non-negative finite numbers by name (e.g. a weight per backbone) with a positive sum."""

    def __call__(self, value) -> bool:
        if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
            return False
        if not all(isinstance(v, Real) and not isinstance(v, (bool, np.bool_)) for v in value.values()):
            return False
        w = np.asarray(list(value.values()), dtype=np.float64)
        return bool(np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0)

    def __str__(self) -> str:
        return "a table of non-negative weights with a positive sum"


BOOL = TypeOf(bool, "true or false")


def describe(constraints) -> str:
    """What a list of constraints accepts, in words."""
    return " or ".join(str(c) for c in constraints)


def validate_params(constraints: dict, params: dict, prefix: str = "") -> None:
    """Check each of ``params`` against its entry in ``constraints`` (a list of accepted kinds: any one
    suffices); a parameter without an entry is not checked. Raises :class:`ParameterError` naming the key as
    ``prefix + name`` (e.g. ``stages.lpp.epochs``)."""
    for name, value in params.items():
        accepted = constraints.get(name)
        if accepted is None or any(c(value) for c in accepted):
            continue
        raise ParameterError(f"{prefix}{name}: expected {describe(accepted)}, got {value!r}")


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
        try:                                # floats, bools, or integers held as objects; never strings
            if y.dtype.kind not in "fbO":
                raise TypeError
            whole = np.all(np.equal(np.mod(y.astype(np.float64), 1), 0))
        except (TypeError, ValueError):
            raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}") from None
        if not whole:
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


def check_support(X, y, text, val=None, require_all: bool = False):
    """``(X, y, text, val)`` of an inductive stage's ``fit``, checked: ``text`` [C, D] and the labels are required,
    ``X`` must match the text's width, ``y`` index its classes (each class needs a row with ``require_all``); ``val``
    ``(val_x, val_y)`` is checked the same way, and None where absent or empty."""
    if text is None:
        raise ValueError("text: the class text embeddings [C, D] are required")
    text = check_features(text, "text")
    X = check_features(X, "X", dim=text.shape[1])
    if y is None:
        raise ValueError("y: the support labels are required")
    y = check_labels(y, X.shape[0], text.shape[0], "y", require_all=require_all)
    if val is not None:
        vx, vy = val
        vx = check_features(vx, "val_x", dim=text.shape[1], min_rows=0)
        vy = check_labels(vy, vx.shape[0], text.shape[0], "val_y", require_all=False)
        val = (vx, vy) if vx.shape[0] else None
    return X, y, text, val


class HasParams:
    """Hyperparameters as scikit-learn keeps them: the keyword arguments of ``__init__``, stored unchanged under
    the same names (shared by :class:`Stage` and the cascade)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
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


class Stage(HasParams):
    """Base class of all stages (see the module docstring for the contract)."""

    #: whether ``fit`` uses the ``query`` rows (transductive) or ignores them (inductive)
    transductive = False
    #: whether ``fit`` accepts soft labels, ``y`` as [N, C] class weights (a refinement of the cascade must)
    soft_labels = False
    #: hyperparameter name -> list of accepted kinds (:class:`Interval`, :class:`Options`, ...)
    _parameter_constraints: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _BY_CLASS[cls.__name__] = cls

    # -- fitting ----------------------------------------------------------------------------------------
    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "Stage":  # pragma: no cover - abstract
        """Learn from support rows ``X`` [Ns, D] (L2-normalised) with labels ``y`` [Ns] in 0..C-1, the classes
        being the rows of ``text`` [C, D]; ``val``: optional held-out ``(Xv, yv)``; ``query``: optional
        [Nq, D] query rows (transductive stages learn from them, inductive ones ignore them)."""
        raise NotImplementedError

    def _validate_params(self) -> None:
        """Check the hyperparameters against ``_parameter_constraints`` (called by ``fit``)."""
        validate_params(type(self)._parameter_constraints, self.get_params())

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

    def predict_log_proba(self, X) -> np.ndarray:
        return log_softmax(np.asarray(self.decision_function(X), dtype=np.float64))

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
        return arrays, dict(describe_stage(self), state=scalars)

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "Stage":
        """Rebuild a stage from :meth:`state_dict`'s output (or an unfitted one from :func:`describe_stage`'s).
        The stage is found by its registered name (``meta["stage"]``), else by its class name."""
        if meta.get("stage") is not None:
            klass = get_stage(meta["stage"])
        else:
            name = meta.get("class")
            if name not in _BY_CLASS:
                raise UnknownStageError(f"unknown stage class {name!r} (registered stages: "
                                        f"{', '.join(stage_names())})")
            klass = _BY_CLASS[name]
        name = klass.__name__
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


def describe_stage(stage: Stage) -> dict:
    """A stage's identity and hyperparameters as JSON: ``{"stage", "class", "params"}`` (``stage``: the registered
    name, None for an unregistered class)."""
    params = {}
    for k, v in stage.get_params().items():
        v = v.tolist() if isinstance(v, np.ndarray) else v
        json.dumps(v)  # raises for a value that cannot be saved without pickle
        params[k] = v
    registered = stage_name(stage)
    return {"stage": registered if registered in _REGISTRY else None, "class": type(stage).__name__,
            "params": params}
