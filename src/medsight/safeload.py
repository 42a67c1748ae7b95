"""Safe loading: every pickle the project reads goes through this module, so nothing in a data or checkpoint
file can run code.

- `load_checkpoint(path)`: `torch.load(weights_only=True)` with an explicit allowlist of the globals that the
  released MedSIGHT `.pt` files and Lightning checkpoints need (numpy scalars and dtypes under both the
  `numpy.core` and `numpy._core` names, `argparse.Namespace`, `_codecs.encode`). Never `weights_only=False`.
- `load_data_pickle(path)`: a restricted unpickler for data pickles (PathVQA's `qas/*.pkl`): plain containers
  and scalars only; any global is refused, naming it, before anything in the file runs.
Anything refused raises `UnsafePickleError` (a `DataError`) naming the file and the global.
"""

from __future__ import annotations

import argparse
import codecs
import io
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data import DataError


class UnsafePickleError(DataError):
    """A pickle asks for a global outside the allowlist; nothing in it was executed."""


def _numpy_globals() -> list[tuple[Any, str]]:
    """(object, dotted name) pairs for numpy's scalar and array reconstructors and its dtypes, under both
    module names a pickle may carry (`numpy.core` before numpy 2, `numpy._core` after)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    out: list[tuple[Any, str]] = [(np.dtype, "numpy.dtype")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray.scalar, f"{mod}.scalar"), (np.ndarray, f"{mod}.ndarray"),
                (multiarray._reconstruct, f"{mod}._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        out += [(getattr(dtypes, n), f"numpy.dtypes.{n}") for n in dir(dtypes)
                if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def checkpoint_globals() -> list[tuple[Any, str]]:
    """The allowlist for `torch.load(weights_only=True)`: what the released checkpoints and Lightning's
    `.ckpt` files need beyond tensors and plain containers."""
    return [*_numpy_globals(), (argparse.Namespace, "argparse.Namespace"), (codecs.encode, "_codecs.encode")]


def _refused_global(err: BaseException) -> str:
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    return m.group(1) if m else text.splitlines()[0][:200]


def load_checkpoint(path: str | Path, map_location: Any = "cpu",
                    extra_globals: Iterable[Any] = (), mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with the allowlist above (plus `extra_globals`: objects or
    (object, "dotted.name") pairs). A refused global raises UnsafePickleError naming the file and it.
    `mmap=True` maps the tensors instead of reading them (a 5 GB checkpoint whose optimizer state is never
    touched costs no memory for it; zip-format files only, others are read normally)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found", path=str(path))
    allow = [*checkpoint_globals(), *extra_globals]
    try:
        with torch.serialization.safe_globals(allow):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(
            f"{path}: refused to unpickle global {_refused_global(err)!r} (not on medsight's allowlist; nothing "
            "in the file was run)", path=str(path), field=_refused_global(err)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot read checkpoint ({' '.join(str(err).split())[:200]})",
                        path=str(path)) from None


#: Builtins a data pickle may name (protocol 0-1 pickles spell some containers as globals).
_DATA_GLOBALS = {("builtins", n) for n in ("list", "dict", "tuple", "set", "frozenset", "str", "bytes",
                                           "int", "float", "bool", "complex")} | {("__builtin__", "set")}


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle's hook
        if (module, name) in _DATA_GLOBALS:
            return super().find_class("builtins" if module == "__builtin__" else module, name)
        raise UnsafePickleError(
            f"{self._path}: refused to unpickle global '{module}.{name}' (data pickles may hold only plain "
            "containers and scalars; nothing in the file was run)", path=self._path, field=f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused a persistent id in a data pickle", path=self._path,
                                field="persistent_id")


def load_data_pickle(path: str | Path) -> Any:
    """Unpickle a data file that may hold only lists, dicts, tuples, sets, strings, numbers, booleans and
    None. Any global (a class, a function) is refused before it is looked up."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pickle file not found", path=str(path))
    try:
        with path.open("rb") as f:
            return _DataUnpickler(f, str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as err:
        raise DataError(f"{path}: cannot read pickle ({type(err).__name__}: {str(err)[:150]})",
                        path=str(path)) from None


def loads_data_pickle(data: bytes, name: str = "<bytes>") -> Any:
    """`load_data_pickle` for bytes already in memory."""
    try:
        return _DataUnpickler(io.BytesIO(data), name).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as err:
        raise DataError(f"{name}: cannot read pickle ({type(err).__name__}: {str(err)[:150]})", path=name) from None


__all__ = ["UnsafePickleError", "checkpoint_globals", "load_checkpoint", "load_data_pickle", "loads_data_pickle"]
