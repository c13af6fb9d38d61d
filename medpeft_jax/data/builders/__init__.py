"""The dataset builders, each registered by name where it is defined (`@register("name")`).

Every module of this package but `base` is a builder file: a new dataset is its file (plus its fake
layout and test), with no list to edit here.
"""

import importlib
import pkgutil

from medpeft_jax.data.builders.base import DATASETS, ImageConfig, MedicalImageBuilder, Record, register

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base":
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATASETS", "ImageConfig", "MedicalImageBuilder", "Record", "register"]
