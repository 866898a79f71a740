"""Writing checkpoint files as other programs wrote them, for the tests that read them back."""

import json

import torch


def write_bin(state, path, shards):
    """pytorch_model.bin, or shards with their index, as transformers 4 wrote them; returns the folder."""
    path.mkdir(exist_ok=True)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return path
    keys, weight_map = list(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        torch.save({k: state[k] for k in part}, path / name)
        weight_map |= {k: name for k in part}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
