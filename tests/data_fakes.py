"""Tiny fake copies of each dataset in its real layout (real file names, real CSV columns).

Images are small random pictures in assorted modes (RGB, L, RGBA, P, 16-bit), so the real reading
code runs on them; each writer returns what the test should expect.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np
from PIL import Image

MODES = ("RGB", "L", "RGBA", "P", "I;16")


def write_image(path: pathlib.Path, rng: np.random.Generator, mode: str = "RGB", size=(28, 20)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  w, h = size
  if mode == "I;16":
    Image.fromarray(rng.integers(0, 4096, (h, w), dtype=np.uint16)).save(path)
    return
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  if mode == "P":
    img = img.quantize(16)
  elif mode != "RGB":
    img = img.convert(mode)
  img.save(path)


def write_csv(path: pathlib.Path, header, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def busi(root: pathlib.Path, per_class=(14, 10, 8), seed=0) -> dict:
  rng = np.random.default_rng(seed)
  base = root / "Dataset_BUSI_with_GT"
  for label, n in zip(("benign", "malignant", "normal"), per_class):
    for i in range(1, n + 1):
      write_image(base / label / f"{label} ({i}).png", rng, MODES[i % 4])
      write_image(base / label / f"{label} ({i})_mask.png", rng, "L")
      if i == 1:
        write_image(base / label / f"{label} ({i})_mask_1.png", rng, "L")
  return {"counts": dict(zip(("benign", "malignant", "normal"), per_class))}


def ham10000(root: pathlib.Path, seed=0) -> dict:
  """100 lesions of 1-3 images each, over the 7 diagnoses, images split across two part folders."""
  rng = np.random.default_rng(seed)
  dx = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
  rows, image_id = [], 24306
  lesions = {}
  for lesion in range(100):
    label = dx[lesion % 7] if lesion < 70 else "nv"
    lesion_id = f"HAM_{lesion:07d}"
    for _ in range(1 + lesion % 3):
      iid = f"ISIC_{image_id:07d}"
      part = 1 if image_id % 2 else 2
      write_image(root / f"HAM10000_images_part_{part}" / f"{iid}.jpg", rng)
      rows.append([lesion_id, iid, label, "histo", "50.0", "male", "back", "vidir_modern"])
      lesions[iid] = lesion_id
      image_id += 1
  write_csv(root / "HAM10000_metadata.csv",
            ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"], rows)
  return {"lesion_of": lesions, "num_images": len(rows)}


def fitzpatrick17k(root: pathlib.Path, seed=0, missing=1) -> dict:
  rng = np.random.default_rng(seed)
  three = ("benign", "malignant", "non-neoplastic")
  nine = ("benign dermal", "benign epidermal", "malignant melanoma", "inflammatory")
  rows, hashes = [], []
  for i in range(36):
    md5 = f"{i:032x}"
    if i >= missing:  # the first rows' images "could not be downloaded"
      write_image(root / "images" / f"{md5}.jpg", rng)
    rows.append([md5, str(1 + i % 6), str(1 + i % 6), f"condition {i % 5}", nine[i % 4], three[i % 3], "",
                 f"https://example.org/{md5}.jpg", f"example{md5}jpg"])
    hashes.append(md5)
  write_csv(root / "fitzpatrick17k.csv",
            ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
             "three_partition_label", "qc", "url", "url_alphanumeric"], rows)
  return {"num_rows": len(rows), "missing": missing, "nine": sorted(set(nine)),
          "conditions": sorted({r[3] for r in rows})}


def smdg(root: pathlib.Path, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(44):
    name = f"OIA-ODIR-TRAIN-{i}"
    kind = ("0", "1", "0", "-1")[i % 4]
    fundus = f"/full-fundus/{name}.png" if i != 5 else ""
    if fundus:
      write_image(root / "full-fundus" / f"{name}.png", rng)
    rows.append([name, kind, "", "1", f"{i}.jpg", f"P{i // 2}", fundus] + [""] * 5 + ["F", "", "58", "OD"])
  header = ["names", "types", "type_expanded", "isColor", "original_name", "patient_id", "fundus",
            "fundus_od_seg", "fundus_oc_seg", "bv_seg", "artery_seg", "vein_seg", "sex", "gender", "age",
            "eye"]
  write_csv(root / "metadata - standardized.csv", header, rows)
  kept = [r for r in rows if r[6] and r[1] != "-1"]
  return {"num_kept": len(kept), "patient_of": {r[0]: r[5] for r in kept}}


def write_dicom(path: pathlib.Path, pixels: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None,
                window=None) -> None:
  from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: PLC0415

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "CR"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  bits = 16 if pixels.dtype == np.uint16 else 8
  ds.BitsAllocated = ds.BitsStored = bits
  ds.HighBit = bits - 1
  ds.PixelRepresentation = 0
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  ds.PixelData = pixels.tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def rsna_pneumonia(root: pathlib.Path, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  label_rows, info_rows, target = [], [], {}
  classes = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
  for i in range(30):
    pid = f"{i:08x}-0000-4000-8000-{i:012x}"
    cls = classes[i % 3]
    if cls == "Lung Opacity":  # one row per box
      label_rows += [[pid, "264.0", "152.0", "213.0", "379.0", "1"],
                     [pid, "562.0", "152.0", "256.0", "453.0", "1"]]
    else:
      label_rows.append([pid, "", "", "", "", "0"])
    info_rows.append([pid, cls])
    target[pid] = int(cls == "Lung Opacity")
    path = root / "stage_2_train_images" / f"{pid}.dcm"
    if i % 2:  # 16-bit, inverted, rescaled and windowed
      pixels = rng.integers(0, 4096, (24, 24), dtype=np.uint16)
      write_dicom(path, pixels, "MONOCHROME1", slope=1.0, intercept=-1024.0, window=(500, 2000))
    else:  # 8-bit MONOCHROME2, as the real RSNA files
      write_dicom(path, rng.integers(0, 256, (24, 24), dtype=np.uint8))
  write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
            label_rows)
  write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], info_rows)
  return {"target": target}


def image_folder(root: pathlib.Path, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  counts = {"covid": 9, "normal": 12, "viral": 8}
  for label, n in counts.items():
    for i in range(n):
      write_image(root / label / ("nested" if i % 3 == 0 else "") / f"img{i}.png", rng, MODES[i % 5])
  (root / "normal" / "notes.txt").write_text("not an image")
  return {"counts": counts}


def csv_dataset(root: pathlib.Path, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(60):
    path = f"scans/{i:03d}.png"
    write_image(root / path, rng)
    rows.append([path, ("benign", "malignant")[i % 2], f"patient{i // 3}"])
  write_csv(root / "labels.csv", ["path", "label", "group"], rows)
  return {"group_of": {r[0]: r[2] for r in rows}}


def write_mimic_cxr(root: pathlib.Path, reports_as_zip: bool = True) -> dict:
  """MIMIC-CXR-JPG's layout: gzipped split/metadata CSVs, files/pXX/p<subject>/s<study>/<dicom>.jpg,
  and the reports zip. Each study has a PA and a LATERAL image; the report decides the prompt."""
  import gzip  # noqa: PLC0415
  import zipfile  # noqa: PLC0415

  rng = np.random.default_rng(7)
  reports = {  # study -> (report text, expected prompt)
      "50000001": (("FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS: Heart size is enlarged.\n\n"
                    " IMPRESSION: \n Cardiomegaly without\n edema.\n"), "Cardiomegaly without edema."),
      "50000002": ("FINAL REPORT\n FINDINGS: No focal consolidation.\n", "No focal consolidation."),
      "50000003": ("FINAL REPORT\n INDICATION: cough.\n", ""),  # neither section: dropped
      "50000004": ("FINAL REPORT\n IMPRESSION: Small left pleural effusion.\n", "Small left pleural effusion."),
      "50000005": ("FINAL REPORT\n IMPRESSION: No acute process.\n", "No acute process."),
  }
  split_of = {"50000001": "train", "50000002": "train", "50000003": "validate", "50000004": "test",
              "50000005": "validate"}
  split_rows, meta_rows, expected = [], [], {}
  for k, (study, (text, prompt)) in enumerate(reports.items()):
    subject = f"1000000{k}"
    for view in ("PA", "LATERAL"):
      dicom = f"{study}-{view.lower()}"
      write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", rng,
                  size=(40, 30))
      split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split_of[study]})
      meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                        "Rows": "30", "Columns": "40"})
      if view == "PA" and prompt:
        expected[dicom] = (prompt, {"train": "train", "validate": "validation", "test": "test"}[split_of[study]])
  for name, rows in (("mimic-cxr-2.0.0-split.csv.gz", split_rows), ("mimic-cxr-2.0.0-metadata.csv.gz", meta_rows)):
    with gzip.open(root / name, "wt", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  if reports_as_zip:
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as z:
      for k, (study, (text, _)) in enumerate(reports.items()):
        z.writestr(f"files/p10/p1000000{k}/s{study}.txt", text)
  else:
    for k, (study, (text, _)) in enumerate(reports.items()):
      (root / "files" / "p10" / f"p1000000{k}" / f"s{study}.txt").write_text(text)
  return expected
