"""Datasets from fake folders in their real layouts, splits, regimes, DICOM, and the grain pipeline."""

import collections
import functools

import numpy as np
import pytest
from absl import flags
from PIL import Image

from medpeft_jax import data
from medpeft_jax.data import dicom, splits
from medpeft_jax.data.builders.mimic_cxr import prompt_from_report, report_sections
from medpeft_jax.data.regimes import PAPER_REGIMES, regime_indices
from tests import data_fakes

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags


# --- DICOM ---------------------------------------------------------------------------------------------

def _ds(tmp_path, pixels, **kw):
  import pydicom

  data_fakes.write_dicom(tmp_path / "x.dcm", pixels, **kw)
  return pydicom.dcmread(tmp_path / "x.dcm")


def test_dicom_without_window_stretches_min_max(tmp_path):
  pixels = np.array([[0, 1000], [2000, 4000]], np.uint16)
  np.testing.assert_array_equal(dicom.dicom_to_uint8(_ds(tmp_path, pixels)), [[0, 64], [128, 255]])


def test_dicom_rescale_then_window(tmp_path):
  # HU = 2 * stored - 1000; window centre 40, width 401: [-160, 240] HU -> [0, 255].
  stored = np.array([[0, 420], [520, 620]], np.uint16)  # HU -1000, -160, 40, 240
  out = dicom.dicom_to_uint8(_ds(tmp_path, stored, slope=2.0, intercept=-1000.0, window=(40, 401)))
  np.testing.assert_array_equal(out, [[0, 0], [128, 255]])


def test_dicom_monochrome1_is_inverted(tmp_path):
  pixels = np.array([[0, 4000]], np.uint16)
  np.testing.assert_array_equal(dicom.dicom_to_uint8(_ds(tmp_path, pixels, photometric="MONOCHROME1")),
                                [[255, 0]])


# --- splits and regimes ----------------------------------------------------------------------------

def test_stratified_group_split_keeps_groups_whole_and_classes_balanced():
  groups = [f"g{i // 3}" for i in range(600)]  # groups of 3
  labels = [int(g[1:]) % 3 for g in groups]  # group-consistent labels, 3 classes
  parts = splits.stratified_group_split(labels, groups)
  again = splits.stratified_group_split(labels, groups)
  assert all(np.array_equal(parts[k], again[k]) for k in parts)  # deterministic
  assert sorted(np.concatenate(list(parts.values()))) == list(range(600))  # a partition
  for name, share in splits.FRACTIONS.items():
    assert abs(len(parts[name]) / 600 - share) < 0.02
    counts = np.bincount(np.asarray(labels)[parts[name]], minlength=3)
    assert counts.min() > 0 and counts.max() - counts.min() <= 3 * 2  # stratified
  owner = {}
  for name, idx in parts.items():
    for i in idx:
      assert owner.setdefault(groups[i], name) == name  # no group in two splits


def test_regimes_are_nested_stratified_and_keep_every_class():
  labels = np.array([0] * 300 + [1] * 60 + [2] * 7)
  previous = set()
  for fraction in PAPER_REGIMES:
    idx = regime_indices(labels, fraction, seed=3)
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.min() >= 1
    assert abs(counts[0] - max(1, round(fraction * 300))) == 0
    assert previous <= set(idx.tolist())  # nested
    previous = set(idx.tolist())
  assert len(previous) == len(labels)
  assert not np.array_equal(regime_indices(labels, 0.1, seed=0), regime_indices(labels, 0.1, seed=1))
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    regime_indices(labels, 10)


def test_near_duplicates_are_grouped_transitively():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (64, 64), dtype=np.uint8)
  noisy = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
  noisier = np.clip(noisy + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
  other = rng.integers(0, 255, (64, 64), dtype=np.uint8)
  thumbs = splits.grey_thumbnails([Image.fromarray(a) for a in (base, other, noisy, noisier)])
  pairs = splits.near_duplicate_pairs(thumbs)
  groups = splits.connected_groups(4, pairs)
  assert groups[0] == groups[2] == groups[3] != groups[1]


# --- builders from fake folders in the real layouts -----------------------------------------------------

def build(tmp_path_factory, name, writer, **options):
  root = tmp_path_factory.mktemp(f"{name}_manual")
  expected = writer(root)
  builder = data.load(name, data_dir=tmp_path_factory.mktemp(f"{name}_tfds"), manual_dir=root, **options)
  return builder, expected, root


def records(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


def all_records(builder):
  return {s: records(builder, s) for s in ("train", "validation", "test")}


def assert_partition(parts, total):
  ids = [r["id"] for recs in parts.values() for r in recs]
  assert len(ids) == len(set(ids)) == total
  for name, share in splits.FRACTIONS.items():
    assert abs(len(parts[name]) / total - share) < 0.12, (name, len(parts[name]), total)


def assert_groups_disjoint(parts):
  owner = {}
  for name, recs in parts.items():
    for r in recs:
      assert owner.setdefault(r["group"], name) == name, r["group"]


def test_busi(tmp_path_factory):
  builder, expected, _ = build(tmp_path_factory, "busi", data_fakes.busi)
  parts = all_records(builder)
  assert_partition(parts, sum(expected["counts"].values()))  # masks skipped
  names = builder.info.features["label"].names
  counts = collections.Counter(names[r["label"]] for recs in parts.values() for r in recs)
  assert counts == expected["counts"]
  image = parts["train"][0]["image"]
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def assert_grouped_by(parts, group_of):
  """Every record carries its expected group, and no group spans two splits."""
  for recs in parts.values():
    for r in recs:
      assert r["group"].decode() == group_of[r["id"].decode()]
  assert_groups_disjoint(parts)


def test_ham10000_splits_by_lesion(tmp_path_factory):
  builder, expected, _ = build(tmp_path_factory, "ham10000", data_fakes.ham10000)
  parts = all_records(builder)
  assert_partition(parts, expected["num_images"])
  assert_grouped_by(parts, expected["lesion_of"])
  assert builder.info.features["label"].names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_fitzpatrick17k_label_sets_and_missing_images(tmp_path_factory):
  root = tmp_path_factory.mktemp("fitz_manual")
  expected = data_fakes.fitzpatrick17k(root)
  tfds_dir = tmp_path_factory.mktemp("fitz_tfds")
  with pytest.raises(ValueError, match=r"cannot read image .*00000000000000000000000000000000\.jpg"):
    data.load("fitzpatrick17k", data_dir=tfds_dir, manual_dir=root)
  three = data.load("fitzpatrick17k", data_dir=tfds_dir, manual_dir=root, on_bad_image="skip")
  assert sum(s.num_examples for s in three.info.splits.values()) == expected["num_rows"] - expected["missing"]
  assert three.info.features["label"].names == ["benign", "malignant", "non-neoplastic"]
  nine = data.load("fitzpatrick17k", data_dir=tfds_dir, manual_dir=root, on_bad_image="skip", label_set="9")
  assert nine.info.features["label"].names == expected["nine"]
  every = data.load("fitzpatrick17k", data_dir=tfds_dir, manual_dir=root, on_bad_image="skip",
                    label_set="114")
  assert every.info.features["label"].names == expected["conditions"]


def test_smdg_drops_suspects_and_groups_by_patient(tmp_path_factory):
  builder, expected, _ = build(tmp_path_factory, "smdg", data_fakes.smdg)
  parts = all_records(builder)
  assert_partition(parts, expected["num_kept"])
  assert_grouped_by(parts, expected["patient_of"])


@pytest.mark.parametrize("label_set", ["2", "3"])
def test_rsna_pneumonia_from_dicom(tmp_path_factory, label_set):
  builder, expected, _ = build(tmp_path_factory, "rsna_pneumonia", data_fakes.rsna_pneumonia,
                               label_set=label_set)
  parts = all_records(builder)
  assert_partition(parts, len(expected["target"]))
  names = builder.info.features["label"].names
  for recs in parts.values():
    for r in recs:
      opacity = names[r["label"]] == "lung_opacity"
      assert opacity == bool(expected["target"][r["id"].decode()])
      assert r["image"].shape == (24, 24, 3)
  assert len(names) == int(label_set)


def test_image_folder_and_csv(tmp_path_factory):
  builder, expected, _ = build(tmp_path_factory, "image_folder", data_fakes.image_folder)
  assert builder.info.features["label"].names == sorted(expected["counts"])
  assert sum(s.num_examples for s in builder.info.splits.values()) == sum(expected["counts"].values())
  builder, expected, _ = build(tmp_path_factory, "csv", data_fakes.csv_dataset)
  parts = all_records(builder)
  assert_partition(parts, len(expected["group_of"]))
  assert_grouped_by(parts, expected["group_of"])


def test_images_are_stored_at_most_max_side(tmp_path_factory):
  root = tmp_path_factory.mktemp("big")
  rng = np.random.default_rng(0)
  for label in ("a", "b"):
    for i in range(8):
      data_fakes.write_image(root / label / f"{i}.png", rng, size=(90, 60))
  builder = data.load("image_folder", data_dir=tmp_path_factory.mktemp("big_tfds"), manual_dir=root,
                      max_side=45)
  assert {r["image"].shape for r in records(builder, "train")} == {(30, 45, 3)}


def test_bad_inputs_get_clear_errors(tmp_path_factory):
  tfds_dir = tmp_path_factory.mktemp("bad_tfds")
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(FileNotFoundError, match=r"(?s)no data in the manual folder.*kmader/skin-cancer-mnist"):
    data.load("ham10000", data_dir=tfds_dir, manual_dir=empty)
  # A corrupt image: an error naming its path, or skipped and counted when asked.
  root = tmp_path_factory.mktemp("corrupt")
  data_fakes.busi(root)
  corrupt = root / "Dataset_BUSI_with_GT" / "benign" / "benign (3).png"
  corrupt.write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"cannot read image .*benign \(3\)\.png"):
    data.load("busi", data_dir=tfds_dir, manual_dir=root)
  skipped = data.load("busi", data_dir=tfds_dir, manual_dir=root, on_bad_image="skip")
  assert sum(s.num_examples for s in skipped.info.splits.values()) == 31
  # Unknown label values are listed.
  root = tmp_path_factory.mktemp("labels")
  data_fakes.ham10000(root)
  csv_path = root / "HAM10000_metadata.csv"
  csv_path.write_text(csv_path.read_text().replace(",mel,", ",melanoma?,", 1))
  with pytest.raises(ValueError, match=r"unknown label values \['melanoma\?'\]"):
    data.load("ham10000", data_dir=tmp_path_factory.mktemp("labels_tfds"), manual_dir=root)
  with pytest.raises(KeyError, match="Unknown dataset 'ham10k'.*br35h.*ham10000"):
    data.load("ham10k", data_dir=tfds_dir)
  with pytest.raises(TypeError, match="Unknown dataset option"):
    data.load("busi", data_dir=tfds_dir, manual_dir=root, max_size=3)


# --- the grain pipeline ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_builder(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe_manual")
  rng = np.random.default_rng(0)
  for label, n in (("a", 30), ("b", 20), ("c", 10)):
    for i in range(n):
      data_fakes.write_image(root / label / f"{i}.png", rng, data_fakes.MODES[i % 5], size=(40, 30))
  return data.load("image_folder", data_dir=tmp_path_factory.mktemp("pipe_tfds"), manual_dir=root)


def take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_train_batches_are_deterministic_for_a_seed_and_resume_exactly(folder_builder):
  split = data.Split(folder_builder, "train")
  make = functools.partial(data.train_loader, split, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                           batch_size=8)
  first, again, other = take(make(seed=1), 6), take(make(seed=1), 6), take(make(seed=2), 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  assert first[0]["image"].shape == (8, 16, 16, 3) and first[0]["image"].dtype == np.float32
  assert first[0]["label"].dtype == np.int32
  # Resume: the state after 3 batches reproduces batches 4-6 in a fresh iterator.
  it = iter(make(seed=1))
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = iter(make(seed=1))
  resumed.set_state(state)
  for expected in first[3:]:
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_train_batches_with_worker_processes_are_deterministic(folder_builder):
  split = data.Split(folder_builder, "train")
  make = functools.partial(data.train_loader, split, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                           batch_size=8, seed=0, worker_count=2)
  for a, b in zip(take(make(), 3), take(make(), 3)):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_loader_covers_each_example_once_with_a_mask(folder_builder):
  split = data.Split(folder_builder, "test")
  batches = list(data.eval_loader(split, image_size=16, mean=(0,) * 3, std=(1,) * 3, batch_size=4))
  assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask == 1]
  assert mask.sum() == len(split) and len(mask) == -(-len(split) // 4) * 4
  np.testing.assert_array_equal(labels, split.labels)


def test_regime_split_is_a_stratified_subset(folder_builder):
  full = data.Split(folder_builder, "train")
  small = data.Split(folder_builder, "train", regime=0.2, regime_seed=0)
  assert set(small.indices) <= set(full.indices)
  counts = small.class_counts()
  assert counts.min() >= 1 and abs(len(small) - 0.2 * len(full)) <= 3


@pytest.mark.parametrize("reports_as_zip", [True, False])
def test_mimic_cxr_frontal_views_with_report_prompts(tmp_path_factory, reports_as_zip):
  builder, expected, _ = build(tmp_path_factory, "mimic_cxr",
                               lambda root: data_fakes.write_mimic_cxr(root, reports_as_zip))
  parts = all_records(builder)
  got = {r["id"].decode(): (r["prompt"].decode(), split) for split, recs in parts.items() for r in recs}
  assert got == expected  # PA only, IMPRESSION over FINDINGS, the official split, no-text studies dropped
  assert {r["view"] for recs in parts.values() for r in recs} == {b"PA"}
  assert max(parts["train"][0]["image"].shape[:2]) <= 256


def test_mimic_cxr_report_sections():
  text = "FINAL REPORT\n COMPARISON: None.\n FINDINGS: Lungs are clear.\n IMPRESSION:\n No acute\n process.\n"
  assert report_sections(text) == {"COMPARISON": "None.", "FINDINGS": "Lungs are clear.",
                                   "IMPRESSION": "No acute process."}
  assert prompt_from_report(text) == "No acute process."
  assert prompt_from_report("FINAL REPORT\n FINDINGS: Clear.\n IMPRESSION:\n") == "Clear."
