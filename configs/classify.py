"""One classifier fine-tuned with one method on one dataset, data regime and seed.

python -m launch.train --config configs/classify.py:model=vit_b16,method=lora,dataset=ham10000,regime=0.1 \\
    --config.weights=/ckpt/vit-base-patch16-224-in21k --config.manual_dir=/data/ham10000 \\
    --workdir runs/ham_lora
python -m launch.params --config configs/classify.py:model=vit_b16,method=lora,num_classes=3
  -> trainable params: 592,131 || all params: 86,390,787 || trainable%: 0.6854

Arguments (comma-separated key=value): model, method (a PEFT method or `scratch`), dataset, regime
(a fraction in (0, 1]), seed, num_classes (for launch.params), smoke (True: a tiny model, 32 px,
batch 8, a few steps — for CPU tests). Everything else is a field below, e.g. --config.lr=1e-3.
Method hyperparameters default to the paper's settings for the model's family
(medpeft_jax/presets.py): --config.peft.rank=8. The paper's recipe: AdamW, batch 512, 30 epochs,
warmup + cosine, weight decay 1e-4, learning rate tuned per method on validation.
"""

import ml_collections

from medpeft_jax import models, presets
from medpeft_jax.config_args import parse_arg
from medpeft_jax.train.trainer import peft_method_name


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = parse_arg(arg, model="vit_b16", method="lora", dataset="br35h", regime=1.0, seed=0, num_classes=3,
                  smoke=False)
  c = ml_collections.ConfigDict()
  c.model, c.method, c.dataset, c.regime, c.seed = arg.model, arg.method, arg.dataset, arg.regime, arg.seed
  c.num_classes = arg.num_classes  # launch.params only; training takes it from the dataset
  c.weights = ""  # pre-trained checkpoint (file or download folder); empty: random initialisation
  c.model_overrides = ml_collections.ConfigDict(presets.TINY_MODELS[models.get_spec(arg.model).family]
                                                if arg.smoke else {})
  c.image_size = 32 if arg.smoke else 0  # 0: the model's pre-training resolution
  c.dtype = "float32"  # compute dtype ("bfloat16" for bf16 activations; parameters stay float32)
  c.remat = False  # rematerialise each block in the backward pass (memory for compute)
  c.peft = presets.preset(arg.model, peft_method_name(arg.method))

  c.data_dir = "~/tensorflow_datasets"  # where built datasets are cached
  c.manual_dir = ""  # the downloaded dataset folder (not needed for br35h)
  c.dataset_options = ml_collections.ConfigDict()  # e.g. label_set, max_side, on_bad_image
  c.workers = 0  # grain worker processes

  c.batch_size = 8 if arg.smoke else 64  # global, per optimizer update
  c.eval_batch_size = 0  # 0: batch_size
  c.grad_accum = 1  # micro-batches per update
  c.epochs = 2 if arg.smoke else 30
  c.total_steps = 0  # > 0 overrides epochs
  c.lr = 0.0  # 0: the method's default (medpeft_jax.train.trainer.DEFAULT_LR)
  c.warmup_fraction = 0.1
  c.weight_decay = 1e-4
  c.grad_clip = 1.0
  c.label_smoothing = 0.0
  c.class_weighted = False  # inverse-frequency class weights in the loss
  c.bn_mode = "train"  # "train": BatchNorm uses and updates batch statistics; "frozen": running ones

  # Devices as data x fsdp (-1: all the rest); leaves of >= min_shard_size elements shard over fsdp.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "min_shard_size": 2**18})
  c.eval_every = 0  # steps; 0: every epoch
  c.checkpoint_every = 4 if arg.smoke else 200  # steps (also at every evaluation)
  c.keep_checkpoints = 2
  c.log_every = 1 if arg.smoke else 10
  c.progress = True  # progress bar
  return c
