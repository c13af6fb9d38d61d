"""One classifier fine-tuned with one method on one dataset, data regime and seed.

python -m launch.train --config configs/classify.py:model=vit_b16,method=lora,dataset=ham10000,regime=0.1 \\
    --config.weights=/ckpt/vit-base-patch16-224-in21k --config.manual_dir=/data/ham10000 \\
    --workdir runs/ham_lora
python -m launch.params --config configs/classify.py:model=vit_b16,method=lora,num_classes=3
  -> trainable params: 592,131 || all params: 86,390,787 || trainable%: 0.6854

Arguments (comma-separated key=value): model, method (a PEFT method, or `scratch` = `full` with
`init=random`), dataset, regime (a fraction in (0, 1]), seed, num_classes (for launch.params), smoke
(True: a tiny random model, 32 px, batch 8, a few steps — for CPU tests), plugins (modules to import
first, joined with +: your own methods/datasets/models). Everything else is a field below, e.g.
--config.lr=1e-3. Without `weights`, a run stops with an error unless `init=random`.
Method hyperparameters default to the paper's settings for the model's family
(medpeft_jax/presets.py): --config.peft.rank=8. The paper's recipe: AdamW, batch 512, 30 epochs,
warmup + cosine, weight decay 1e-4, learning rate tuned per method on validation.
"""

import ml_collections

from medpeft_jax import models, plugins, presets
from medpeft_jax.config_args import parse_arg
from medpeft_jax.config_checks import dataset_options_section
from medpeft_jax.data import DATASETS
from medpeft_jax.peft import METHODS
from medpeft_jax.train import sharding


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = parse_arg(arg, model="vit_b16", method="lora", dataset="br35h", regime=1.0, seed=0, num_classes=3,
                  smoke=False, plugins="")
  plugins.load(arg.plugins)
  c = ml_collections.ConfigDict()
  run = presets.variant(arg.method)  # "scratch" -> full from a random initialisation
  c.model, c.method, c.dataset, c.regime, c.seed = arg.model, run["method"], arg.dataset, arg.regime, arg.seed
  c.plugins = arg.plugins  # modules joined with +, imported again by the trainer (and its workers)
  c.num_classes = arg.num_classes  # launch.params only; training takes it from the dataset
  c.init = "random" if arg.smoke else run["init"]  # "pretrained" (from `weights`, required) or "random"
  c.weights = ""  # pre-trained checkpoint (file or download folder)
  c.model_overrides = ml_collections.ConfigDict(presets.TINY_MODELS[models.get_spec(arg.model).family]
                                                if arg.smoke else {})
  c.image_size = 32 if arg.smoke else 0  # 0: the model's pre-training resolution
  c.dtype = "float32"  # compute dtype ("bfloat16" for bf16 activations; parameters stay float32)
  c.remat = False  # rematerialise each block in the backward pass (memory for compute)
  # The method's hyperparameters, at its preset for the model (a plugin's method not imported yet: empty).
  c.peft = presets.config_fields(arg.model, c.method) if c.method in METHODS else {}

  c.data_dir = "~/tensorflow_datasets"  # where built datasets are cached
  c.manual_dir = ""  # the downloaded dataset folder (not needed for br35h)
  # The dataset's build options (label_set, max_side, on_bad_image, ...) at its defaults, each settable.
  c.dataset_options = dataset_options_section(arg.dataset) if arg.dataset in DATASETS else {}
  c.workers = 0  # grain worker processes
  c.cache_images_mb = 2048  # keep decoded images in memory up to this size (0: decode every time)

  c.batch_size = 8 if arg.smoke else 64  # global, per optimizer update
  c.eval_batch_size = 0  # 0: batch_size
  c.grad_accum = 1  # micro-batches per update
  c.epochs = 2 if arg.smoke else 30
  c.min_steps = 0  # a floor on epochs x steps per epoch, for tiny regimes
  c.total_steps = 0  # > 0 overrides epochs and min_steps
  c.lr = 0.0  # 0: the method's default (medpeft_jax/presets.py DEFAULT_LR)
  c.warmup_fraction = 0.1
  c.weight_decay = 1e-4
  c.grad_clip = 1.0
  c.label_smoothing = 0.0
  c.class_weighted = False  # inverse-frequency class weights in the loss
  c.bn_mode = "train"  # "train": BatchNorm uses and updates batch statistics; "frozen": running ones
  c.linear_on_features = True  # `linear`: train the head on cached eval-mode trunk features (train/linear_probe.py)

  # Devices as data x fsdp (-1: all the rest). Base leaves whose path a `rules` regex fully matches
  # shard over fsdp ("fsdp", when >= min_shard_size elements) or not ("replicate"); adapters and
  # optimizer state inherit their base leaf's placement (medpeft_jax/train/sharding.py). Runs trained
  # together (`runs_together` of a sweep) spread over `runs` rows of data x fsdp devices (1: unsplit).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "runs": 1, "min_shard_size": 2**18,
                                      "rules": sharding.DEFAULT_RULES})
  c.eval_every = 0  # steps; 0: every epoch
  c.patience = 0  # early stopping: evaluations without a better validation macro-F1 before stopping; 0: off
  c.checkpoint_every = 4 if arg.smoke else 200  # steps (and at the end)
  c.keep_checkpoints = 2
  c.log_every = 1 if arg.smoke else 10
  c.progress = True  # progress bar
  c.profile_steps = (0, 0)  # (start, stop): trace steps [start, stop) with jax.profiler to <workdir>/profile
  return c
