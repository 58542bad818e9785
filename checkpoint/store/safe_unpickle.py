"""Read other frameworks' pickles without running their code.

DCP's `.metadata` is a plain pickle and DeepSpeed's `.pt` files are `torch.save` archives; a pickle
may name any callable, and unpickling calls it. Both kinds go through an allowlist here: a plain
pickle through `pickle.Unpickler.find_class` (the standard library's documented way to restrict
globals), a torch archive through `torch.load(weights_only=True)` with just the extra classes its
format needs. A name not on the list is refused, with the file and the name, before anything is
built. Classes of a framework that need not be installed (DeepSpeed's loss scaler, say) are given
as `opaque(name)`: a stand-in that keeps the pickled fields and runs nothing.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


class UnsafePickle(CheckpointError):
    """A pickle asked for a global outside the allowlist of the format being read."""


class Opaque:
    """A pickled object of a class that is not imported: its fields, kept as they were pickled."""

    pickled_as = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.pickled_as} (not imported)>"


def opaque(name: str) -> type[Opaque]:
    """A stand-in class for `name` ("module.Class"), to list in an allowlist."""
    return type(name.rsplit(".", 1)[-1], (Opaque,), {"pickled_as": name})


def load_pickle(path: Path, allowed: Mapping[str, Any], *, what: str) -> Any:
    """Unpickle `path`, a plain pickle of a `what` file, admitting only the globals in `allowed`."""
    try:
        with open(path, "rb") as f:
            return _Restricted(f, allowed, path=path, what=what).load()
    except UnsafePickle:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the {what} is incomplete") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable {what} ({type(e).__name__}: {e}); it may be truncated"
        ) from None


def load_torch(path: Path, allowed: Mapping[str, Any], *, what: str) -> Any:
    """`torch.load` of `path` (a `what` file) with weights_only, admitting also the globals in `allowed`.

    Memory-mapped, so reading one tensor of a large archive does not read the rest."""
    extra = [(obj, name) for name, obj in allowed.items()]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the {what} is incomplete") from None
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL (\S+)", str(e))
        why = f"it asks for {asked.group(1)}" if asked else str(e).strip().splitlines()[-1]
        raise UnsafePickle(
            f"{path}: refused to load it as a {what}: {why}. Only the classes a {what} needs are admitted, "
            "and nothing of the file ran; if the file is from a newer version of its framework, report it"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable {what} ({e}); it may be truncated") from None


class _Restricted(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, allowed: Mapping[str, Any], *, path: Path, what: str) -> None:
        super().__init__(file)
        self.allowed, self.path, self.what = allowed, path, what

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self.allowed:
            return self.allowed[key]
        raise UnsafePickle(
            f"{self.path}: the pickle asks for {key}, which a {self.what} does not contain; refused, and nothing "
            "of the file ran. The file is damaged, crafted, or of a format version this reader does not know"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle(f"{self.path}: the pickle refers to external objects ({pid!r}); a {self.what} has none")
