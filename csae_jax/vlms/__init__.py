"""Torch-free Flax NNX ports of the vision-language models the paper studies.

Each port is a module returning named intermediates (sites such as `vision/block_23`) that
accepts edits of those sites (pure functions) for harvesting and steering without hooks, plus an
`hf_name_map` that `hf.load` uses to read a local Hugging Face safetensors snapshot.
Submodules are imported explicitly (`from csae_jax.vlms import qwen3_vl`) so that importing
the package stays cheap.
"""
