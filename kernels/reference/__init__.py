"""The plain-PyTorch reference math of TransMamba: one implementation of each piece.

``ssd`` (chunked SSD scan, token-by-token scan, one decoding step), ``conv`` (causal conv +
SiLU and its step), ``norm`` (RMSNorm, gated grouped RMSNorm), ``rope`` (rotary embedding),
``memory_converter`` (attention prefix -> SSM state), ``attention`` (causal softmax attention,
grouped by Q/K group, over a KV cache), ``cache`` (the decoding caches) and ``mixer`` (the
TransMamba mixer's core: forward, prefill that fills a cache, and one decoding step).

Every module imports only torch and its siblings, by relative import, so the folder stands
alone: ``megatron_transmamba.hf.export`` copies these files verbatim next to the exported
``modeling_transmamba.py`` (``trust_remote_code`` loads them), and the package's torch paths,
the kernels' specifications (``transmamba_kernels.<op>.naive``) and decoding import the same
functions. Precision policy: math in float32 (float64 for a float64 model); cached SSM states
and processed dt are kept in that compute dtype, conv states and keys / values in the model's.
"""
