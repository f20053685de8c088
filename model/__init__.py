"""The model in pure PyTorch, usable alone in one process: config, checkpoint loading, tokenizer and
chat format, kernels, attention, the dense forward, the MoE layer pieces and a reference MoE,
sampling and structured outputs (grammar masks), the built-in tiny checkpoint. Imports nothing else
of the project; never Ray.
"""
