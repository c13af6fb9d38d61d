"""The dataset builders, registered by name."""

from medpeft_jax.data.builders.base import ImageConfig, MedicalImageBuilder, Record
from medpeft_jax.data.builders.br35h import Br35h
from medpeft_jax.data.builders.busi import Busi
from medpeft_jax.data.builders.fitzpatrick17k import Fitzpatrick17k
from medpeft_jax.data.builders.generic import MedCsv, MedImageFolder
from medpeft_jax.data.builders.ham10000 import Ham10000
from medpeft_jax.data.builders.mimic_cxr import MimicCxr
from medpeft_jax.data.builders.rsna_pneumonia import RsnaPneumonia
from medpeft_jax.data.builders.smdg import Smdg
from medpeft_jax.registry import Registry

DATASETS: Registry[type[MedicalImageBuilder]] = Registry("dataset")
for _name, _cls in (("busi", Busi), ("ham10000", Ham10000), ("fitzpatrick17k", Fitzpatrick17k),
                    ("smdg", Smdg), ("rsna_pneumonia", RsnaPneumonia), ("br35h", Br35h),
                    ("image_folder", MedImageFolder), ("csv", MedCsv), ("mimic_cxr", MimicCxr)):
  DATASETS.register(_name, _cls)

__all__ = ["DATASETS", "ImageConfig", "MedicalImageBuilder", "Record"]
