"""Experiments as code: each module has get_config(arg) and get_sweep(config).

`module_of(path)` gives a config file's module: configs/<name>.py is imported as
configs.<name>; a config file elsewhere (a user's variant) is run from its path.
"""

import importlib
import runpy
import types
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def module_of(path: str | Path) -> types.ModuleType | types.SimpleNamespace:
  file = Path(path).resolve()
  if file.parent == _HERE and file.suffix == ".py":
    return importlib.import_module(f"{__name__}.{file.stem}")
  return types.SimpleNamespace(**runpy.run_path(str(file)))
