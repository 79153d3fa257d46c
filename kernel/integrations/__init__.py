"""Adapters that put flashtune's attention where people already call attention.

- `flashtune.kernel.integrations.transformers`: `register()` adds flashtune to Hugging Face
  transformers' attention registry (`model.set_attn_implementation(register())`); needs the
  optional extra (from a checkout: `pip install ".[transformers]"`).
- `flashtune.kernel.integrations.torch`: `route_sdpa()` sends `F.scaled_dot_product_attention`
  calls whose key the database says the tuned kernel wins to flashtune, and leaves the rest to torch.

Nothing here is imported by `flashtune.kernel` itself: each adapter loads only when asked for.
"""
