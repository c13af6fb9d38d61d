"""The paper's Table 4: Stable Diffusion v1.5's U-Net fine-tuned on MIMIC-CXR with 8 strategies, FID.

python -m launch.bench --config configs/paper_table4.py:pipeline=/ckpt/stable-diffusion-v1-5,mimic=/data/mimic-cxr-jpg,inception=/ckpt/pt_inception-2015-12-05-6726825d.pth \\
    --workdir runs/table4
python -m launch.report --results runs/table4/results.jsonl --metric fid --out runs/table4/report

8 strategies (full, attention, bias, norm, bias_norm_attention, lora, svdiff, difffit) x MIMIC-CXR
regimes 10 / 50 / 100 % of the training split, seed 42; each run trains 15k steps at 224 px with a
constant LR (1e-5 full, 1e-4 PEFT, 1e-3 SV-Diff's shifts) and grad-norm clip 1, then samples the
impressions of 1,000 test images (PNDM, 75 steps, guidance 4) with 4 sampling seeds; FID (and KID)
against those 1,000 test images, mean over the 4 seeds. The text encoder and VAE run once per
dataset (the latent cache). Not run here (needs the SD v1.5 weights, MIMIC-CXR-JPG and an accelerator).
Trainable parameters (ours; paper in brackets): full 859.5M, bias 0.34M, norm 0.20M, LoRA 0.80M,
SV-Diff 0.22M, DiffFit 0.48M [0.58M, see medpeft_jax/presets.py]. `sweep(..., smoke=True)` gives
the CPU test's sizes (tests/test_t2i.py).
"""

import ml_collections

from configs import bench, t2i
from medpeft_jax.config_args import parse_arg

METHODS = ("full", "attention", "bias", "norm", "bias_norm_attention", "lora", "svdiff", "difffit")


def sweep(methods, datasets, regimes, seeds, smoke=False) -> ml_collections.ConfigDict:
  """A text-to-image sweep (task "t2i"): bench.sweep's fields plus the pipeline, captions and FID settings."""
  c = bench.sweep(["stable_diffusion_v1_5"], methods, datasets, regimes, seeds, smoke=smoke)
  c.task = "t2i"
  c.pipeline = ""  # diffusers-format SD v1.5 folder
  c.captions = ml_collections.ConfigDict()  # dataset -> prompt template for datasets without prompts
  c.run = t2i.get_config(f"smoke={smoke}")
  c.fid = ml_collections.ConfigDict({
      "weights": "",  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
      "split": "test", "num_images": 8 if smoke else 1000, "choice_seed": 0,
      "seeds": (0,) if smoke else (0, 1, 2, 3), "steps": 2 if smoke else 75, "guidance": 4.0, "sampler": "",
      "batch_size": 4 if smoke else 25, "kid_subsets": 10 if smoke else 100, "kid_subset_size": 1000})
  c.report.metric = "fid"
  del c.lr_search  # fixed learning rates: the paper's constant 1e-5 / 1e-4
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, pipeline="", mimic="~/medical_data/mimic-cxr-jpg", inception="", data_root="~/tensorflow_datasets")
  c = sweep(METHODS, ["mimic_cxr"], [0.1, 0.5, 1.0], [42])
  c.pipeline, c.fid.weights = a.pipeline, a.inception
  c.manual_dirs["mimic_cxr"] = a.mimic
  c.run.data_dir = a.data_root
  return c
