"""No silent wrong data: builds follow their source folder, class sets are checked, regimes are in range."""

import json
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from medpeft_jax import data
from tests import data_fakes


def folder(root: pathlib.Path, seed: int, classes=("a", "b"), n: int = 8) -> pathlib.Path:
  """`n` tiny PNGs per class; `seed` makes other pictures under the same names."""
  rng = np.random.default_rng(seed)
  for c in classes:
    for i in range(n):
      data_fakes.write_image(root / c / f"{i}.png", rng, size=(12, 10))
  return root


def stored(builder) -> dict[str, bytes]:
  """{id: stored JPEG bytes} over all splits."""
  out = {}
  for split in ("train", "validation", "test"):
    src = builder.as_data_source(split)
    for i in range(len(src)):
      r = src[i]
      out[r["id"].decode()] = np.asarray(r["image"]).tobytes()
  return out


def builds(data_dir: pathlib.Path) -> list[pathlib.Path]:
  """Finished build folders under data_dir (tfds renames its temporary folder only on success)."""
  return sorted(p.parent for p in data_dir.glob("*/*/*/dataset_info.json"))


def test_another_folder_with_the_same_classes_is_built_anew(tmp_path):
  a, b = folder(tmp_path / "A", seed=0), folder(tmp_path / "B", seed=1)
  data_dir = tmp_path / "tfds"
  from_a = stored(data.load("image_folder", data_dir=data_dir, manual_dir=a))
  from_b_builder = data.load("image_folder", data_dir=data_dir, manual_dir=b)
  from_b = stored(from_b_builder)
  assert sorted(from_a) == sorted(from_b)  # same ids ...
  assert all(from_a[i] != from_b[i] for i in from_a)  # ... other pictures: B's, not A's build
  ids = {"/".join(p.relative_to(b).parts) for p in b.rglob("*.png")}
  assert set(from_b) == ids
  identity = json.loads((pathlib.Path(from_b_builder.data_dir) / "source.json").read_text())
  assert identity["path"] == str(b.resolve()) and identity["files"] == 16
  assert identity["bytes"] == sum(p.stat().st_size for p in b.rglob("*.png"))
  assert len(builds(data_dir)) == 2


def test_an_unchanged_folder_reuses_its_build(tmp_path, caplog):
  root = folder(tmp_path / "A", seed=0)
  data_dir = tmp_path / "tfds"
  first = pathlib.Path(data.load("image_folder", data_dir=data_dir, manual_dir=root).data_dir)
  before = {p: p.stat().st_mtime_ns for p in first.iterdir()}
  with caplog.at_level(logging.INFO):
    again = pathlib.Path(data.load("image_folder", data_dir=data_dir, manual_dir=str(root) + "/").data_dir)
  assert again == first and builds(data_dir) == [first]
  assert {p: p.stat().st_mtime_ns for p in first.iterdir()} == before  # nothing rewritten
  assert (first / "source.json").is_file()
  assert "reusing the build" in caplog.text


def test_a_corrupt_image_added_after_the_build_is_read_and_refused(tmp_path, caplog):
  root = folder(tmp_path / "A", seed=0)
  data_dir = tmp_path / "tfds"
  good = pathlib.Path(data.load("image_folder", data_dir=data_dir, manual_dir=root).data_dir)
  (root / "b" / "late.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
  with caplog.at_level(logging.INFO), pytest.raises(ValueError, match=r"cannot read image .*b/late\.jpg.*"
                                                    r"dataset option on_bad_image='skip'"):
    data.load("image_folder", data_dir=data_dir, manual_dir=root)
  assert "changed since the build" in caplog.text and "17 files" in caplog.text
  assert builds(data_dir) == [good]  # no build written from the changed folder
  skipped = data.load("image_folder", data_dir=data_dir, manual_dir=root, on_bad_image="skip")
  assert len(stored(skipped)) == 16 and pathlib.Path(skipped.data_dir) != good


def test_an_empty_class_folder_is_refused(tmp_path):
  root = folder(tmp_path / "A", seed=0)
  (root / "c" / "notes").mkdir(parents=True)
  (root / "c" / "notes" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"class folder\(s\) \[.*A/c'\] hold no images.*remove the folder"):
    data.load("image_folder", data_dir=tmp_path / "tfds", manual_dir=root)
  assert not (tmp_path / "tfds").exists() or not builds(tmp_path / "tfds")


def test_class_folders_differing_only_by_case_are_refused(tmp_path):
  root = folder(tmp_path / "A", seed=0, classes=("tumor", "Tumor", "no_tumor"))
  with pytest.raises(ValueError, match=r"'Tumor' \(.*A/Tumor\), 'tumor' \(.*A/tumor\) differ only by case"):
    data.load("image_folder", data_dir=tmp_path / "tfds", manual_dir=root)


def labelled(root: pathlib.Path, labels) -> pathlib.Path:
  """A csv dataset in `root`: one tiny image per label value; returns labels.csv."""
  rng = np.random.default_rng(0)
  for i in range(len(labels)):
    data_fakes.write_image(root / "img" / f"{i}.png", rng, size=(12, 10))
  rows = [[f"img/{i}.png", v] for i, v in enumerate(labels)]
  data_fakes.write_csv(root / "labels.csv", ["path", "label"], rows)
  return root / "labels.csv"


def test_csv_labels_with_spaces_case_or_empty_values_are_refused(tmp_path):
  labels = ["tumor", "no_tumor"] * 6 + [" tumor", "Tumor", "", "no_tumor "]
  csv_path = labelled(tmp_path / "data", labels)
  with pytest.raises(ValueError) as e:
    data.load("csv", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "data")
  msg = str(e.value)
  assert str(csv_path) in msg and "column 'label'" in msg
  assert "empty label value at line 16" in msg  # row 14 (0-based), after the header
  assert "' tumor' (line 14), 'Tumor' (line 15), 'tumor' (line 2, line 4, line 6" in msg
  assert "'no_tumor' (line 3, " in msg and "'no_tumor ' (line 17) differ only by case or spaces" in msg
  assert not (tmp_path / "tfds").exists()
  # Fixed: the same rows build, with exactly two classes.
  data_fakes.write_csv(csv_path, ["path", "label"],
                       [[f"img/{i}.png", v.strip().lower() or "tumor"] for i, v in enumerate(labels)])
  builder = data.load("csv", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "data")
  assert builder.info.features["label"].names == ["no_tumor", "tumor"]


def test_a_csv_label_with_surrounding_spaces_alone_is_refused(tmp_path):
  labelled(tmp_path / "data", ["a", "a", "b ", "b "])
  with pytest.raises(ValueError, match=r"'b ' \(line 4, line 5\) has leading/trailing spaces: remove them"):
    data.load("csv", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "data")


def test_a_data_dir_inside_the_source_folder_is_refused(tmp_path):
  root = folder(tmp_path / "A", seed=0)
  with pytest.raises(ValueError, match=r"data_dir .*A/tfds is inside the source folder .*A: .*outside it"):
    data.load("image_folder", data_dir=root / "tfds", manual_dir=root)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  root = folder(tmp_path_factory.mktemp("regime_manual"), seed=0)
  return data.load("image_folder", data_dir=tmp_path_factory.mktemp("regime_tfds"), manual_dir=root)


@pytest.mark.parametrize("regime", [1.5, 0.0, -0.1])
def test_regimes_outside_0_1_are_refused(builder, regime):
  with pytest.raises(ValueError, match=rf"in \(0, 1\], not {regime}: e\.g\. regime=0\.1 for 10 %"):
    data.Split(builder, "train", regime=regime)
  assert len(data.Split(builder, "train", regime=1.0)) == builder.info.splits["train"].num_examples


def test_br35h_is_identified_by_its_installed_folder():
  from medpeft_jax import assets
  from medpeft_jax.data.builders.br35h import Br35h

  root = Br35h.source_root("/somewhere/else")
  assert root == assets.asset_path("br35h").resolve()
  config = data.make_config("br35h", max_side=128)
  assert config.source.path == str(root) and config.source.files >= 3000
  assert config.name == f"max_side128_src{config.source.key}"


def test_the_fingerprint_sees_a_replaced_file_of_the_same_name(tmp_path):
  root = folder(tmp_path / "A", seed=0)
  before = data.make_config("image_folder", root).source
  Image.new("RGB", (5, 5)).save(root / "a" / "0.png")
  after = data.make_config("image_folder", root).source
  assert after.files == before.files and after.key != before.key
