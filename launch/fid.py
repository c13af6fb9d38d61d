"""FID and KID between two image sets with the standard FID Inception-v3 (pytorch-fid's weights, local).

python -m launch.fid --real data/mimic_test_1000 --fake runs/gen --weights /ckpt/pt_inception-2015-12-05-6726825d.pth
Each set: a folder of same-sized images or an .npz with an `images` array (launch.generate writes
one). Prints JSON {fid, kid, kid_std, num_real, num_fake}; --out writes it too.
"""

from absl import app, flags

from medpeft_jax.diffusion.fid import compare_sets
from medpeft_jax.train import logs

_REAL = flags.DEFINE_string("real", None, "Real images: folder or .npz.", required=True)
_FAKE = flags.DEFINE_string("fake", None, "Generated images: folder or .npz.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "pt_inception-2015-12-05-6726825d.pth (pytorch-fid).",
                               required=True)
_BATCH = flags.DEFINE_integer("batch_size", 50, "Images per Inception batch.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")


def main(argv):
  del argv
  logs.print_json(compare_sets(_REAL.value, _FAKE.value, _WEIGHTS.value, batch_size=_BATCH.value), _OUT.value)


if __name__ == "__main__":
  app.run(main)
