"""The CLIP text encoder of Stable Diffusion (OpenAI CLIP ViT-L/14's text tower), Flax linen.

Parameter names follow transformers' `CLIPTextModel` (without its `text_model.` prefix), so the
diffusers checkpoint converts by renaming alone:
  embeddings/token_embedding/embedding, embeddings/position_embedding/embedding
  encoder/layers_{i}/layer_norm1, self_attn/{q,k,v,out}_proj/{kernel,bias}, layer_norm2,
  encoder/layers_{i}/mlp/{fc1,fc2}/{kernel,bias}
  final_layer_norm/{scale,bias}
Causal self-attention over 77 tokens; Stable Diffusion conditions on the last hidden state.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407

  @classmethod
  def from_dict(cls, d: dict) -> CLIPTextConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name in ("gelu", "gelu_new"):
    return lambda x: jax.nn.gelu(x, approximate=name == "gelu_new")
  raise ValueError(f"Unsupported hidden_act {name!r} (quick_gelu, gelu, gelu_new).")


class CLIPAttention(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return dense("out_proj")(y.reshape(x.shape[:2] + (c.hidden_size,)))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = _activation(c.hidden_act)(nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    eps = self.config.layer_norm_eps
    x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(
        nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x), mask)
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
    return x


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(input_ids)
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding")(
        jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPTextModel(nn.Module):
  """`(input_ids (B, T) int32) -> (last_hidden_state (B, T, D), pooled (B, D))`; pooled = EOS token."""
  config: CLIPTextConfig = CLIPTextConfig()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    if input_ids.shape[-1] > c.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[-1]} tokens exceed the {c.max_position_embeddings} positions.")
    x = CLIPTextEmbeddings(c, name="embeddings")(input_ids).astype(self.dtype)
    causal = jnp.tril(jnp.ones((input_ids.shape[-1],) * 2, bool))[None, None]
    x = CLIPEncoder(c, self.dtype, name="encoder")(x, causal)
    x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x).astype(jnp.float32)
    # transformers' rule: the first EOS token (legacy configs with eos_token_id 2: the highest id)
    eos = (jnp.argmax(input_ids, -1) if c.eos_token_id == 2
           else jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), -1))
    return x, x[jnp.arange(x.shape[0]), eos]
