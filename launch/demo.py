"""The main job until the benchmark lands (see medpeft_jax/demo.py).

python -m launch.demo                      # scikit-image's cat and coffee photos
python -m launch.demo --image a.jpg --image b.png
"""

from absl import app, flags

from medpeft_jax import demo

_IMAGES = flags.DEFINE_multi_string("image", None, "Photos to classify (default: scikit-image samples).")


def main(argv):
  del argv
  demo.run(_IMAGES.value)


if __name__ == "__main__":
  app.run(main)
