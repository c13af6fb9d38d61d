"""Converts adapters between Hugging Face PEFT folders and ours (medpeft_jax/peft/interop/hf_peft.py).

HF PEFT folder -> our adapter (then `launch.evaluate`, `launch.export`, `launch.predict` take it):
python -m launch.hf_peft --hf runs/hf_lora --model vit_b16 --weights /ckpt/vit-base --adapter runs/ours
Our adapter -> HF PEFT folder (`peft.PeftModel.from_pretrained` loads it onto the torch model whose
`state_dict()` file `--names_from` is: its module names are the adapter's):
python -m launch.hf_peft --to_hf --adapter runs/x/best_adapter --names_from vit_state_dict.bin --hf runs/hf_out

Methods both ways: LoRA and DoRA (plain, rsLoRA; per-module ranks as rank_pattern/alpha_pattern, e.g. a
`launch.merge_adapters --combination=cat` adapter), PiSSA, AdaLoRA, IA3, VeRA (our own; an imported VeRA
needs torch's projections at apply time and stays an HF folder), LoHa, LoKr, OFT. A trained head (or any
whole module trained in place) travels as HF's `modules_to_save`; a method that trains parts of modules in
place (BitFit) has no HF adapter form and is refused.
"""

import json

from absl import app, flags

from medpeft_jax import models, peft
from medpeft_jax.peft.interop import hf_peft

_HF = flags.DEFINE_string("hf", None, "The HF PEFT folder to read (or, with --to_hf, to write).", required=True)
_ADAPTER = flags.DEFINE_string("adapter", None, "Our adapter folder to write (or, with --to_hf, to read).",
                               required=True)
_TO_HF = flags.DEFINE_bool("to_hf", False, "Convert our adapter to an HF PEFT folder (default: the other way).")
_MODEL = flags.DEFINE_string("model", None, "Our model name (import).")
_WEIGHTS = flags.DEFINE_string("weights", None, "The base checkpoint (import: conv taps and the preprocessing check).")
_NAMES_FROM = flags.DEFINE_string("names_from", None, "Export: the torch model's checkpoint or state_dict() file.")


def import_hf(folder: str, model_name: str, weights: str, out: str, **model_overrides) -> dict:
  """HF PEFT folder -> our adapter folder (`model_overrides`: module fields, for tiny test models)."""
  spec = models.get_spec(model_name)
  _, variables, _ = models.load_pretrained(model_name, weights, num_classes=0, **model_overrides)
  method, trainable, derived = hf_peft.load_hf_peft(folder, model_name, variables["params"])
  if derived:
    raise ValueError(f"{folder} is a VeRA adapter whose shared projections torch drew: they are not ours to "
                     "regenerate from a seed, so it stays an HF folder (apply it with hf_peft.load_hf_peft and "
                     "derived=...).")
  size = peft.save_adapter(out, method, trainable, base_model=model_name, converted_from=str(folder),
                           preprocessing={"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)})
  return {"adapter": out, "method": method.name, "modules": len(trainable["adapters"]), "bytes": size}


def export_hf(adapter_dir: str, names_from: str, out: str, **model_overrides) -> dict:
  """Our adapter folder -> HF PEFT folder; a trained head travels as `modules_to_save`."""
  adapter = peft.load_adapter(adapter_dir)
  head = adapter.trainable["params"].get("head/kernel")
  _, variables, _ = models.load_pretrained(adapter.base_model, names_from, num_classes=0 if head is None else
                                           head.shape[-1], **model_overrides)
  folder = hf_peft.save_hf_peft(out, adapter.method, adapter.trainable, variables["params"],
                                hf_peft.hf_module_names(names_from, adapter.base_model))
  return {"hf_folder": str(folder), "method": adapter.method.name, "modules": len(adapter.trainable["adapters"])}


def main(argv):
  del argv
  if _TO_HF.value:
    if not _NAMES_FROM.value:
      raise app.UsageError("--to_hf needs --names_from (the torch model's checkpoint or state_dict() file).")
    result = export_hf(_ADAPTER.value, _NAMES_FROM.value, _HF.value)
  else:
    if not (_MODEL.value and _WEIGHTS.value):
      raise app.UsageError("Importing needs --model and --weights (the base checkpoint).")
    result = import_hf(_HF.value, _MODEL.value, _WEIGHTS.value, _ADAPTER.value)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
