"""Checkpoint directories someone hands you, and model sizes that no model can have. Each mistake is one
ValueError line (tools/cli.run prints it) that names the --option, or the file and its field or key; nothing
outside the checkpoint's directory is read and nothing in it runs. Every model is the nano preset."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from panda import PandaConfig, VideoPanda
from test_faults import Payload
from checkpoints.checkpoint_dirs import CheckpointError, from_pretrained, save_pretrained


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A nano model and its export in the Hugging Face layout: config.json, model.safetensors (the decoder),
    panda_config.json and panda_video.safetensors."""
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano")).eval()
    path = tmp_path_factory.mktemp("export") / "nano"
    save_pretrained(model, None, path)
    return model, path


def copy_of(export, tmp_path):
    return shutil.copytree(export[1], tmp_path / "ckpt")


def decoder_state(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def refused(path):
    """The CheckpointError (a ValueError: one line on the command line) that loading path ends in."""
    with pytest.raises(CheckpointError) as error:
        from_pretrained(path)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("changes, message", [
    (dict(stab_heads=0), "--stab_heads must be positive, got 0"),      # each of these three divided by zero
    (dict(chunk_frames=0), "--chunk_frames must be positive, got 0"),
    (dict(patch_size=0), "--patch_size must be positive, got 0"),
    (dict(n_frames=-4), "--n_frames must be positive, got -4"),
    (dict(d_model=-32), "--d_model must be positive, got -32"),
    (dict(n_layers=-1), "--n_layers must be zero or more, got -1"),
    (dict(lste_reduction=0.0), "--lste_reduction must be positive"),
    (dict(stab_dropout=1.0), "--stab_dropout must be below 1, got 1.0"),
    (dict(rms_eps=math.nan), "--rms_eps must be positive, got nan"),
    (dict(rope_theta=math.inf), "--rope_theta must be positive, got inf"),
    (dict(d_model=30), "--head_dim (or --d_model // --n_heads) must be even for the rotary embeddings' channel pairs, got 7"),
])
def test_an_impossible_model_size_is_one_line_naming_the_option_or_the_file(changes, message, export, tmp_path):
    with pytest.raises(ValueError) as error:
        PandaConfig.preset("nano", **changes)
    assert str(error.value).startswith(message)
    saved = json.loads((export[1] / "panda_config.json").read_text())
    if set(changes) <= set(saved):  # the same value in an export's panda_config.json: the line names that file
        path = copy_of(export, tmp_path)
        (path / "panda_config.json").write_text(json.dumps(saved | changes))
        line = refused(path)
        assert line.startswith(str(path / "panda_config.json")) and message in line


@pytest.mark.parametrize("name, content, message", [
    ("config.json", '{"model_type": "llama",', "not valid JSON"),
    ("config.json", "[" * 200_000, "not valid JSON"),  # deeper than Python's recursion limit
    ("config.json", [1, 2], "not a JSON object"),
    ("config.json", {"hidden_size": "32"}, "hidden_size must be a positive 64-bit integer, got '32'"),
    ("config.json", {"hidden_size": -32}, "hidden_size must be a positive 64-bit integer, got -32"),
    ("config.json", {"num_attention_heads": 4.0}, "num_attention_heads must be a positive 64-bit integer, got 4.0"),
    ("config.json", {"vocab_size": True}, "vocab_size must be a positive 64-bit integer, got True"),
    ("config.json", {"rms_norm_eps": math.nan}, "NaN is not a JSON number"),
    ("config.json", {"rope_theta": -1.0}, "rope_theta must be a positive finite number, got -1.0"),
    ("config.json", {"rope_scaling": ["llama3", 8.0]}, "rope_scaling must be an object {...} or null"),
    ("config.json", {"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ("panda_config.json", {"n_frames": "4"}, "n_frames must be a 64-bit integer, got '4'"),
    ("panda_config.json", {"stab_dropout": math.inf}, "Infinity is not a JSON number"),
    ("panda_config.json", {"letterbox": 1}, "letterbox must be true or false, got 1"),
])
def test_a_config_file_of_the_wrong_shape_is_one_line_naming_it_and_the_field(name, content, message, export,
                                                                             tmp_path):
    path = copy_of(export, tmp_path)
    if isinstance(content, dict):  # a change to the export's own file
        content = json.loads((path / name).read_text()) | content
    (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    line = refused(path)
    assert line.startswith(str(path / name)) and message in line


@pytest.mark.parametrize("shard, message", [
    (None, "not a JSON object"),  # the index is a list
    ({"metadata": {}}, 'needs a "weight_map"'),
    ({"weight_map": ["model.safetensors"]}, 'needs a "weight_map"'),
    ({"weight_map": {"model.norm.weight": 3}}, 'needs a "weight_map"'),
    ("../outside.safetensors", "shard '../outside.safetensors' is not a file name"),
    ("ABSOLUTE", "is not a file name; shards are files beside the index"),
])
def test_an_index_that_is_malformed_or_leads_out_of_the_directory_is_refused(shard, message, export, tmp_path):
    """The shard outside is a good one: read, it would load. Shards are plain file names in the index's directory."""
    path = copy_of(export, tmp_path)
    keys = list(decoder_state(path))
    outside = tmp_path / "outside.safetensors"
    (path / "model.safetensors").rename(outside)
    if shard is None:
        index = keys
    elif isinstance(shard, dict):
        index = shard
    else:
        name = str(outside) if shard == "ABSOLUTE" else shard
        index = {"metadata": {}, "weight_map": {key: name for key in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused(path)
    assert line.startswith(str(path / "model.safetensors.index.json")) and message in line


@pytest.mark.parametrize("case", ["truncated", "garbage", "pickle", "not a tensor", "nan", "legacy"])
def test_a_weight_file_that_cannot_be_used_is_one_line_naming_it(case, export, tmp_path):
    """A safetensors file cut short or of garbage, a .bin that would run code or holds a number where a tensor
    belongs, a NaN in a weight: refused, naming the file (and the key). A .bin in torch's legacy format is read."""
    model, _ = export
    path, marker = copy_of(export, tmp_path), tmp_path / "was-run"
    state, file = decoder_state(path), path / "model.safetensors"
    if case in ("truncated", "garbage"):
        data = file.read_bytes()
        file.write_bytes(data[:-100] if case == "truncated" else data[:8] + b"not a header" * 10)
        message = "not a readable safetensors file"
    elif case == "nan":
        state["model.norm.weight"][3] = math.nan
        save_file(state, file)
        message = "'model.norm.weight' holds NaN or infinite values"
    else:
        file.unlink()
        file = path / "pytorch_model.bin"
        if case == "legacy":  # torch < 1.6's format, which cannot be mapped from disk
            torch.save(state, file, _use_new_zipfile_serialization=False)
            loaded, _ = from_pretrained(path)
            for name, tensor in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], tensor), name
            return
        wrong = {"note": Payload(marker)} if case == "pickle" else {"model.norm.weight": 1.0}
        torch.save(state | wrong, file)
        message = "could run code" if case == "pickle" else "'model.norm.weight' holds a float, not a tensor"
    line = refused(path)
    assert line.startswith(str(file)) and message in line
    assert not marker.exists()
