"""DICOM to 8-bit grey, by one documented rule.

  1. Modality LUT: stored values x Rescale Slope + Rescale Intercept (e.g. to Hounsfield units).
  2. VOI window: with Window Center c and Width w in the header (the first pair when several), the
     DICOM linear function maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] to [0, 255], clipping outside;
     without a window, the image's own [min, max] is stretched to [0, 255].
  3. MONOCHROME1 (bright = low values) is inverted so that bright is always high, as MONOCHROME2.
  4. Rounded to uint8. Colour (RGB / YBR) DICOMs are returned as decoded RGB.
"""

from __future__ import annotations

import os

import numpy as np


def _first(value):
  try:
    return float(value[0])
  except TypeError:
    return float(value)


def dicom_to_uint8(ds) -> np.ndarray:
  """A pydicom Dataset -> uint8 array, (H, W) grey or (H, W, 3) colour."""
  pixels = ds.pixel_array
  photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
  if not photometric.startswith("MONOCHROME"):
    from pydicom.pixels import convert_color_space  # noqa: PLC0415

    if photometric.startswith("YBR"):
      pixels = convert_color_space(pixels, photometric, "RGB")
    return np.asarray(pixels, np.uint8)
  x = pixels.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
  x += float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
  center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
  if center is not None and width is not None and _first(width) > 1:
    c, w = _first(center), _first(width)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
  else:
    lo, hi = float(x.min()), float(x.max())
    y = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
  y = np.clip(y, 0.0, 255.0)
  if photometric == "MONOCHROME1":
    y = 255.0 - y
  return np.round(y).astype(np.uint8)


def read_dicom(path: str | os.PathLike) -> np.ndarray:
  import pydicom  # noqa: PLC0415  (only datasets in DICOM need it)

  return dicom_to_uint8(pydicom.dcmread(path))
