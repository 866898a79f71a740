"""Checkpoints in and out: Hugging Face Llama-family LLMs, the released Video-Panda-7B, and our own
exports.

    model, tokenizer = from_pretrained("path/to/local/dir")    # nothing is ever downloaded
    save_pretrained(model, tokenizer, "out/my-export")           # Hugging Face layout
    save_pretrained(model, tokenizer, "out/videopanda-mine", layout="release")

from_pretrained goes by config.json's model_type, and by whether panda_config.json is there:
  llama, mistral, qwen2   a decoder-only LLM (Vicuna, Llama 2/3, TinyLlama, SmolLM, Mistral, Qwen2):
                          its weights fill the decoder; the STAB and projector are new, initialised
                          as their constructors do
    with panda_config.json  our Hugging Face-layout export: the STAB and projector come from
                          panda_video.safetensors
  videopanda              the release's layout: jh-yi/Video-Panda-7B (videopanda_fitu or
                          videopanda_prtr1), or our export in that layout

save_pretrained writes either layout (docs/checkpoints.md says which to choose for what).
panda_config.json holds the PandaConfig fields that config.json does not: the video geometry, the
STAB's widths, the ablation switches.

Every load is strict: a key the checkpoint should not have, a key it lacks, or a tensor of the wrong
shape is a CheckpointError naming the key. The only keys skipped are derived buffers and, in the
release, the documented duplicates and training-only weights (OFFICIAL_DROPPED, OFFICIAL_ALIASES).

A checkpoint may come from anyone, so every file is read as untrusted: a config value of the wrong
type or out of range, an index naming a shard outside the directory, a weight file that is cut
short, holds NaN or inf, or is a pickle that would run code, is a CheckpointError naming the file
and the field or key (docs/checkpoints.md).
"""

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, fields, replace
from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoints import run_files
from checkpoints.run_files import CheckpointError
from panda import PandaConfig, VideoPanda, rope_inv_freq

LLM_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = LLM_TYPES + ("videopanda",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",  # looked for in this order
                "pytorch_model.bin", "pytorch_model.bin.index.json")
PANDA_CONFIG = "panda_config.json"         # beside config.json in both layouts we write
# The STAB and projector of the Hugging Face layout, under our names
VIDEO_WEIGHTS = "panda_video.safetensors"
VIDEO_PREFIXES = ("stab.", "projector.")


# ============================================================================================
# config.json -> PandaConfig
# ============================================================================================

# Hugging Face config field -> PandaConfig field, for the fields that map one to one (read and
# written).
HF_FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
             "num_attention_heads": "n_heads", "intermediate_size": "ffn_dim",
             "rms_norm_eps": "rms_eps", "vocab_size": "vocab_size",
             "max_position_embeddings": "max_seq_len"}


# What a value in a JSON config file may hold. JSON has one kind of number, so an integer field
# needs a number without a fraction (and not true or false), any other a finite one: Python's json
# reads NaN, Infinity and 1e999 (as inf), and integers of any length. Ranges beyond these are
# PandaConfig's rules.
LARGEST = sys.float_info.max
KINDS = {"size": ("a positive 64-bit integer", lambda v: type(v) is int and 0 < v < 2 ** 63),
         "integer": ("a 64-bit integer", lambda v: type(v) is int and abs(v) < 2 ** 63),
         "positive": ("a positive finite number",
                      lambda v: type(v) in (int, float) and 0 < v <= LARGEST),
         "number": ("a finite number", lambda v: type(v) in (int, float) and abs(v) <= LARGEST),
         "bool": ("true or false", lambda v: type(v) is bool),
         "str": ("a string", lambda v: type(v) is str)}


def json_value(values, key, kind, where, default=None):
    """values[key], checked to be of KINDS[kind] (a float for the two kinds of number); default
    where it is absent or null. where names the file in the error, e.g. "dir/config.json:"."""
    value = values.get(key)
    if value is None:
        return default
    text, ok = KINDS[kind]
    if not ok(value):
        raise CheckpointError(f"{where} {key} must be {text}, got {value!r:.80}")
    return float(value) if kind in ("positive", "number") else value


def read_json(file):
    """The JSON object in file; anything else (not JSON, NaN or Infinity, nested too deep, not an
    object) is a CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text(), parse_constant=refuse_constant)
    except (ValueError, RecursionError) as err:  # a file that is not UTF-8 is a ValueError too
        raise CheckpointError(f"{file}: not valid JSON: {err}") from None
    if type(value) is not dict:
        raise CheckpointError(f"{file}: not a JSON object {{...}} but {value!r:.40}")
    return value


def refuse_constant(name):
    """json.loads's parse_constant, called for NaN, Infinity and -Infinity: Python's, not JSON's."""
    raise ValueError(f"{name} is not a JSON number")


def read_config(path):
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: from_pretrained needs a local Hugging "
                                f"Face-style directory")
    hf = read_json(file)
    if hf.get("model_type") not in SUPPORTED_TYPES:
        raise ValueError(f"{file}: model_type {hf.get('model_type')!r} is not supported; "
                         f"supported model types: {', '.join(SUPPORTED_TYPES)}")
    return hf


def decoder_fields(hf, file="config.json"):
    """The decoder's PandaConfig fields from a Llama/Mistral/Qwen2 config.json (either rope layout),
    each of the kind it must be (KINDS): a CheckpointError names the file and the field."""
    missing = [k for k in HF_FIELDS if hf.get(k) is None]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise ValueError(f"{file}: panda's decoder has a SiLU-gated MLP without biases; found "
                         f"hidden_act={hf.get('hidden_act')!r}, mlp_bias={hf.get('mlp_bias')}")
    # Qwen2's q/k/v biases are implied by its model_type, not this field
    if hf.get("attention_bias", False):
        raise ValueError(f"{file}: attention_bias=true puts a bias on o_proj as well, which "
                         f"panda's decoder lacks")
    where = f"{file}:"
    out = {ours: json_value(hf, theirs, "positive" if ours == "rms_eps" else "size", where)
           for theirs, ours in HF_FIELDS.items()}
    heads = out["n_heads"]
    out["n_kv_heads"] = json_value(hf, "num_key_value_heads", "size", where, heads)
    head_dim = json_value(hf, "head_dim", "integer", where, 0)
    # 0 = "the usual", as PandaConfig says
    out["head_dim"] = 0 if head_dim == out["d_model"] // heads else head_dim
    out["tie_embeddings"] = json_value(hf, "tie_word_embeddings", "bool", where, False)
    # Qwen2 always has q/k/v biases, and none on o_proj
    out["qkv_bias"] = hf["model_type"] == "qwen2"
    # Mistral's sliding_window is on whenever set; Qwen2's only with use_sliding_window.
    sliding = json_value(hf, "use_sliding_window", "bool", where, hf["model_type"] == "mistral")
    window = json_value(hf, "sliding_window", "size", where) if sliding else None
    if window and window < out["max_seq_len"]:
        # Mistral v0.1 attends to the last 4096 tokens only; panda attends to all, so the two agree
        # up to there.
        out["max_seq_len"] = window
    return out | rope_fields(hf, file)


def rope_fields(hf, file):
    """transformers v5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}}; older files
    write a top-level rope_theta and "rope_scaling": null or {"type" (or "rope_type"): ...,
    "factor": ...}."""
    name = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope, where = hf.get(name) or {}, f"{file}: {name}'s"
    if type(rope) is not dict:
        raise CheckpointError(f"{file}: {name} must be an object {{...}} or null, "
                              f"got {rope!r:.80}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = json_value(rope, "rope_theta", "positive", where)
    out = {"rope_theta": theta or json_value(hf, "rope_theta", "positive", f"{file}:", 10000.0)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise ValueError(f"{file}: rope type {kind!r} is not supported; panda's decoder does "
                         f"'default' and 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if rope.get(k) is None]
    if missing:
        raise CheckpointError(f"{file}: {name} of rope type 'llama3' lacks {missing}")
    return out | {"rope_factor": json_value(rope, "factor", "positive", where),
                  "rope_low_freq_factor": json_value(rope, "low_freq_factor", "positive", where),
                  "rope_high_freq_factor": json_value(rope, "high_freq_factor", "positive", where),
                  "rope_original_max_len": json_value(rope, "original_max_position_embeddings",
                                                      "size", where,
                                                      hf["max_position_embeddings"])}


def config_from_hf(hf, preset="paper", **overrides):
    """Decoder fields from a Hugging Face config; video and STAB fields from the preset; then the
    caller's overrides."""
    return PandaConfig.preset(preset, **(decoder_fields(hf) | overrides))


def read_saved_fields(path):
    """The PandaConfig fields in panda_config.json, or None where there is no such file (a directory
    we did not write). Fields this PandaConfig lacks are an error; fields it has and the file lacks
    take their defaults."""
    file = path / PANDA_CONFIG
    if not file.is_file():
        return None
    saved = read_json(file)
    types = {f.name: type(f.default) for f in fields(PandaConfig)}
    unknown = set(saved) - set(types)
    if unknown:
        raise CheckpointError(f"{file}: fields this PandaConfig does not know: {sorted(unknown)}")
    # the field's type; its range is PandaConfig's
    kinds = {int: "integer", float: "number", bool: "bool", str: "str"}
    checked = {name: json_value(saved, name, kinds[types[name]], f"{file}:") for name in saved}
    return {name: value for name, value in checked.items() if value is not None}  # null: default


def file_config(path, hf, saved, preset):
    """The PandaConfig that the directory's files describe: config.json's decoder, with
    panda_config.json's other fields where there is one, else the preset's. A configuration that no
    model can have is the files' doing, and a CheckpointError names them."""
    # An unknown preset: the caller's
    base = PandaConfig.preset(preset) if saved is None else PandaConfig()
    decoder = decoder_fields(hf, path / "config.json")
    try:
        return replace(base, **((saved or {}) | decoder))
    except ValueError as err:
        files = (path / "config.json" if saved is None
                 else f"{path / PANDA_CONFIG} with config.json")
        raise CheckpointError(f"{files}: {err}") from None


# ============================================================================================
# Key tables: checkpoint key -> the names of our tensors it fills
# ============================================================================================
# One checkpoint tensor usually fills one of ours. When it fills several (the release's packed GSTRA
# q/k/v), the checkpoint tensor is our tensors concatenated along dim 0, in the order listed.

LAYER_TENSORS = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
QKV_BIASES = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]


def llm_key_map(cfg):
    """Our decoder keeps Hugging Face's names, under `decoder.` instead of `model.`. No permutation
    of q_proj or k_proj is needed: Hugging Face Llama checkpoints store them in the rotate-half
    layout our decoder uses."""
    table = {"model.embed_tokens.weight": ["decoder.embed_tokens.weight"],
             "model.norm.weight": ["decoder.norm.weight"]}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = ["decoder.lm_head.weight"]
    for i in range(cfg.n_layers):
        for name in LAYER_TENSORS + (QKV_BIASES if cfg.qkv_bias else []):
            table[f"model.layers.{i}.{name}"] = [f"decoder.layers.{i}.{name}"]
    return table


# Release module under model.video_tower. -> our module under stab.; the tensor names below them are
# the same.
OFFICIAL_STAB_MODULES = {
    "patch_embedding": "patch_embed",
    "lmhra1.pos_embed.0": "lste.norm",     # BatchNorm3d, running statistics included
    "lmhra1.pos_embed.1": "lste.reduce",
    "lmhra1.pos_embed.2": "lste.temporal",
    "lmhra1.pos_embed.3": "lste.expand",
    "dpe": "lste.dpe",
    "dec.ln_1": "gstra.attn.q.0",          # LayerNorm on the query
    "dec.ln_3": "gstra.attn.kv.0",         # LayerNorm on the keys and values
    "dec.attn.out_proj": "gstra.attn.proj",
    "dec.ln_2": "gstra.norm",
    "dec.mlp.c_fc": "gstra.mlp.0",
    "dec.mlp.c_proj": "gstra.mlp.3",
    "proj.0": "fuse.0",                    # proj.1 is a Dropout
    "proj.2": "fuse.2",
    "local_attention": "lsd.attn",
    "global_attention": "fsra.attn",
}
OFFICIAL_STAB_TENSORS = {"class_embedding": "fsra.query", "split_embedding": "split_token",
                         "balance": "balance", "temporal_cls_token": "gstra.query"}
UNSQUEEZED = {"model.video_tower.temporal_cls_token"}  # the release stores GSTRA's query (1, 1, C)
OFFICIAL_DROPPED = (
    # a second LSTE branch the release never calls
    "model.video_tower.lmhra2.", "model.vision_tower.lmhra2.",
    # distillation head, training only (it holds an alias of the teacher too)
    "model.video_tower_compressor.",
    "model.video_teacher.",           # the frozen LanguageBind teacher, training only
)
# The release registers its STAB and projector under two names each, so every tensor is stored
# twice.
OFFICIAL_ALIASES = {"model.vision_tower.": "model.video_tower.",
                    "model.mm_projector.": "model.video_projector."}


def official_key_map(model):
    """Every key of the release's state dict (VideoPandaLlamaForCausalLM) that we load, built from
    our own module tree so that the names are exact."""
    table = {}
    for theirs, ours in OFFICIAL_STAB_MODULES.items():
        for name in model.stab.get_submodule(ours).state_dict():
            table[f"model.video_tower.{theirs}.{name}"] = [f"stab.{ours}.{name}"]
    for theirs, ours in OFFICIAL_STAB_TENSORS.items():
        table[f"model.video_tower.{theirs}"] = [f"stab.{ours}"]
    # nn.MultiheadAttention packs rows [Q; K; V]; our query and key/value projections are separate,
    # kv rows [K; V].
    for part in ("weight", "bias"):
        table[f"model.video_tower.dec.attn.in_proj_{part}"] = [f"stab.gstra.attn.q.1.{part}",
                                                              f"stab.gstra.attn.kv.1.{part}"]
    for name in model.projector.state_dict():
        table[f"model.video_projector.{name}"] = [f"projector.{name}"]
    return table | llm_key_map(model.cfg)


# ============================================================================================
# Reading tensors and copying them in
# ============================================================================================

def weight_files(path):
    """The checkpoint's files: a single file, or the shards its index names."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        shards = shard_names(file)
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{file} names shards that are not in {path}: {absent}")
        return [path / s for s in shards]
    raise FileNotFoundError(f"no weights in {path}: looked for {', '.join(WEIGHT_FILES)}")


def shard_names(index):
    """The shards an index's weight_map names. Each must be a plain file name: a shard is a file of
    the index's own directory (or a link there, as in Hugging Face's cache), never a path that leads
    elsewhere."""
    weight_map = read_json(index).get("weight_map")
    if (type(weight_map) is not dict
            or not all(type(name) is str for name in weight_map.values())):
        raise CheckpointError(f'{index}: not a checkpoint index: it needs a "weight_map" of key -> '
                              f'shard file name')
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if Path(name).name != name or name in ("", ".."):
            raise CheckpointError(f"{index}: shard {name!r} is not a file name; shards are files "
                                  f"beside the index")
    return shards


# The dtypes whose NaN and inf a load refuses: those a model is kept in (torch has no isfinite for
# float8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_tensors(files):
    """Yield (file, key, tensor), one shard at a time, so that at most one shard is held besides the
    model. A file that cannot be read (cut short, not weights, a pickle that would run code), a
    value that is not a tensor and a tensor holding NaN or inf are a CheckpointError naming the
    file, and the key where there is one."""
    for file in files:
        for key, tensor in (safetensors_items(file) if file.suffix == ".safetensors"
                            else bin_items(file)):
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{file}: {key!r} holds a {type(tensor).__name__}, "
                                      f"not a tensor")
            if tensor.dtype in FLOAT_DTYPES and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{file}: {key!r} holds NaN or infinite values")
            yield file.name, key, tensor


def safetensors_items(file):
    """(key, tensor) of a safetensors file, each read when it is asked for."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except SafetensorError as err:  # safetensors checks the header against the file's length
        raise CheckpointError(f"{file}: not a readable safetensors file: {err}") from None


def bin_items(file):
    """(key, tensor) of a pytorch_model.bin, a pickle. torch's weights_only unpickler builds
    tensors and plain data and refuses anything else before calling it: a file that would run code
    is refused without running it. torch's zip format is mapped (mmap: the shard stays on disk and
    pages in as each tensor is copied); the legacy format of torch < 1.6, which cannot be mapped,
    is read whole."""
    with open(file, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # how torch.load itself tells the two apart
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as err:  # torch.load raises many kinds; each means "not weights we can read"
        raise CheckpointError(f"{file}: {bin_problem(err, zipped)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a dict of named "
                              f"tensors")
    for key in list(state):
        yield key, state.pop(key)


def bin_problem(err, zipped):
    """What torch.load's error says about a .bin, in one line."""
    text = str(err)
    # The weights_only unpickler names the function or class the file would call
    if "GLOBAL" in text:
        return ("refused: it holds objects other than tensors and plain data, which could run code "
                "when loaded")
    # torch's reason, after paragraphs of advice
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = (found[1] if found else text.strip() or type(err).__name__).splitlines()[0]
    if zipped:
        return f"not a readable PyTorch weights file: {reason}"
    return (f"not readable as PyTorch weights ({reason}); if it is a .bin in torch's legacy "
            f"format, re-save it on a machine where you trust it: "
            f"torch.save(torch.load(file, weights_only=False), file)")


def model_tensors(model):
    """Our parameters and persistent buffers by name; a tied lm_head counts once, as the
    embedding."""
    tensors = model.state_dict(keep_vars=True)
    if model.cfg.tie_embeddings:
        del tensors["decoder.lm_head.weight"]
    return tensors


def load_into(model, path, stream, table, fresh=()):
    """Copy every (file, key, tensor) of `stream` into the tensors table[key] names. All our tensors
    must be filled except those under the `fresh` prefixes; anything unexpected, missing or
    mis-shaped is an error."""
    ours = model_tensors(model)
    covered = {name for names in table.values() for name in names}
    uncovered = [n for n in ours if n not in covered and not n.startswith(fresh)]
    # A bug here, not in the checkpoint: panda.py has tensors this file does not know about
    if uncovered:
        raise RuntimeError(f"checkpoints/checkpoint_dirs.py's key table does not cover {uncovered}")
    filled = set()
    for file, key, tensor in stream:
        if key not in table:
            raise CheckpointError(f"{path / file}: unexpected key {key!r}")
        copy_checked(f"{path / file}", key, tensor, [ours[n] for n in table[key]])
        filled.add(key)
    missing = [key for key in table if key not in filled]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing key(s), e.g. {missing[:5]}")


def copy_checked(where, key, tensor, targets):
    want = targets[0].shape
    if len(targets) > 1:  # one checkpoint tensor for several of ours: they are stacked along dim 0
        want = torch.Size([sum(t.shape[0] for t in targets), *want[1:]])
    want = torch.Size([1, 1, *want]) if key in UNSQUEEZED else want
    if tensor.shape != want:
        raise CheckpointError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(want)}")
    pieces = tensor.reshape(-1).split([t.numel() for t in targets])  # row-major: a split of dim 0
    with torch.no_grad():
        for target, piece in zip(targets, pieces):
            # Casts to the model's dtype and moves to its device
            target.copy_(piece.view(target.shape))


def without_derived(stream, cfg):
    for file, key, tensor in stream:
        # transformers 4.31 and older saved it; it follows from the config
        if key.endswith("rotary_emb.inv_freq"):
            continue
        # Some tied checkpoints store the head anyway
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue
        yield file, key, tensor


def official_stream(stream, aliases):
    """Drop the release's training-only weights; set its alias copies aside (appended to
    `aliases`)."""
    for file, key, tensor in stream:
        if key.startswith(OFFICIAL_DROPPED):
            continue
        alias = next((a for a in OFFICIAL_ALIASES if key.startswith(a)), None)
        if alias:
            aliases.append((file, key, OFFICIAL_ALIASES[alias] + key[len(alias):], tensor))
            continue
        yield file, key, tensor


def check_aliases(model, path, aliases, table):
    """Each alias copy must equal what its video_* original loaded (both went through the same
    cast)."""
    ours = model_tensors(model)
    for file, key, original, tensor in aliases:
        if original not in table:
            raise CheckpointError(f"{path / file}: unexpected key {key!r}")
        loaded = torch.cat([ours[n].detach().reshape(-1) for n in table[original]])
        if (tensor.numel() != loaded.numel()
                or not torch.equal(tensor.reshape(-1).to(loaded), loaded)):
            raise CheckpointError(f"{path / file}: {key!r} should be a copy of {original!r} "
                                  f"but differs")


def empty_model(cfg, dtype, device, fresh_visual):
    """VideoPanda(cfg) with uninitialised storage: a 7B decoder is never randomly initialised only
    to be overwritten, and never held twice. With fresh_visual, the STAB and projector get their
    constructors' init."""
    model = run_files.uninitialised_model(cfg, dtype, device)
    # A donor with a one-token, zero-layer decoder runs the real STAB and projector constructors
    if fresh_visual:
        donor = VideoPanda(replace(cfg, n_layers=0, vocab_size=1))
        model.stab.load_state_dict(donor.stab.state_dict())
        model.projector.load_state_dict(donor.projector.state_dict())
    return model


def read_tokenizer(path, tokenizer_path):
    file = Path(tokenizer_path) if tokenizer_path else path / "tokenizer.json"
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.is_file():
        if tokenizer_path:
            raise FileNotFoundError(f"tokenizer_path={tokenizer_path}: no tokenizer.json there")
        return None
    return run_files.read_tokenizer(file)


# ============================================================================================
# The public API
# ============================================================================================

def from_pretrained(path, dtype=None, device="cpu", preset="paper", tokenizer_path=None,
                    **config_overrides):
    """Load a local checkpoint directory -> (VideoPanda in eval mode, tokenizers.Tokenizer or None).

    dtype defaults to bfloat16 on CUDA and float32 elsewhere. The decoder's shape comes from
    config.json; the rest of the PandaConfig from panda_config.json where there is one (our
    exports), else from `preset` ("paper": 8 frames of 448px, STAB width 1024). config_overrides
    (e.g. n_frames=8, grad_checkpoint=True) go last.

    The tokenizer is tokenizer_path (a tokenizer.json, or a directory holding one), else
    <path>/tokenizer.json, else None. The release is tokenised with Vicuna-7B-v1.5's SentencePiece
    tokenizer and may ship no tokenizer.json; neither does lmsys/vicuna-7b-v1.5 on the Hub
    (tokenizer.model only). Make one once, on a machine with transformers and sentencepiece:
        AutoTokenizer.from_pretrained("lmsys/vicuna-7b-v1.5").save_pretrained("vicuna-tokenizer")
    and pass tokenizer_path="vicuna-tokenizer" (or copy its tokenizer.json next to config.json).
    That is the fast tokenizer converted from tokenizer.model; the release ran the slow one
    (use_fast=False), and the two can differ in corner cases (spaces next to special tokens).
    """
    path = Path(path)
    hf = read_config(path)
    kind = hf["model_type"]
    saved = read_saved_fields(path)
    if saved is None and (path / VIDEO_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} has {VIDEO_WEIGHTS} but no {PANDA_CONFIG}, which says how "
                                f"to build the model it belongs to: copy both from the export")
    # A bad override names its --option
    cfg = replace(file_config(path, hf, saved, preset), **config_overrides)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        model = empty_model(cfg, dtype, device, fresh_visual=kind in LLM_TYPES and saved is None)
    except run_files.ModelTooLarge as err:  # sizes that the files ask for, as a rule
        raise CheckpointError(f"{path}: {err}") from None
    stream = read_tensors(weight_files(path))
    if kind == "videopanda":
        table, aliases = official_key_map(model), []
        load_into(model, path, official_stream(without_derived(stream, cfg), aliases), table)
        check_aliases(model, path, aliases, table)
    elif saved is None:
        load_into(model, path, without_derived(stream, cfg), llm_key_map(cfg),
                  fresh=VIDEO_PREFIXES)
    else:
        video = path / VIDEO_WEIGHTS
        if not video.is_file():
            raise FileNotFoundError(f"{path} has {PANDA_CONFIG} but no {VIDEO_WEIGHTS}, which "
                                    f"holds the STAB and projector: copy both from the export")
        table = llm_key_map(cfg) | {name: [name] for name in model_tensors(model)
                                    if name.startswith(VIDEO_PREFIXES)}
        load_into(model, path, chain(without_derived(stream, cfg), read_tensors([video])), table)
    return model.eval(), read_tokenizer(path, tokenizer_path)


LAYOUTS = ("hf", "release")


def save_pretrained(model, tokenizer, path, overwrite=False, layout="hf", family=None,
                    max_shard_size="5GB"):
    """Write `model` as a checkpoint directory, with tokenizer.json when a tokenizer is given.

    layout="hf": the decoder as a standard checkpoint of its family (config.json; model.safetensors,
    or shards of at most max_shard_size and model.safetensors.index.json), which
    AutoModelForCausalLM and Llama-family runtimes load as they would the base LLM. Beside it, files
    they never open: panda_video.safetensors (the STAB and projector) and panda_config.json.
    family: "llama", "mistral" or "qwen2"; None picks qwen2 for a decoder with q/k/v biases and
    llama otherwise.
    layout="release": the release's own layout (VideoPandaLlamaForCausalLM), for its evaluation
    scripts; a ValueError lists anything in the model that the release's code cannot build.

    Tensors keep their dtype: a bf16 model exports bf16. The export is built in a temporary
    directory and renamed into place, so a reader finds the old export, none, or the new one, never
    a mix. A non-empty directory that is not one of our exports is only replaced (with everything
    in it) when overwrite=True."""
    if layout == "hf":
        config, tensors, video = hf_export(model, family)
    elif layout == "release":
        if family not in (None, "llama"):
            raise ValueError(f"family={family!r}: the release's layout holds a Llama decoder only")
        config, tensors, video = *release_export(model), None
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    shard = shard_bytes(max_shard_size)
    saved = {k: v for k, v in asdict(model.cfg).items() if k not in decoder_fields(config)}

    def write(folder):
        write_weights(folder, tensors, shard)
        if video is not None:
            save_tensors(folder / VIDEO_WEIGHTS, video)
        write_json(folder / "config.json", config)
        write_json(folder / PANDA_CONFIG, saved)
        if tokenizer is not None:
            tokenizer.save(str(folder / "tokenizer.json"))

    replace_directory(Path(path), overwrite, write)


# ============================================================================================
# The Hugging Face layout
# ============================================================================================

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
# Each family's switches for what panda's decoder lacks: biases other than Qwen2's on q/k/v, and a
# sliding window (panda attends to all max_seq_len positions, so max_position_embeddings says how
# far the decoder reaches).
FAMILY_SWITCHES = {"llama": {"attention_bias": False, "mlp_bias": False},
                   "mistral": {"sliding_window": None},
                   "qwen2": {"use_sliding_window": False, "sliding_window": None}}


def hf_export(model, family):
    """(config.json, the decoder's tensors under the family's names, the STAB's and projector's
    under ours)."""
    cfg = model.cfg
    family = pick_family(cfg, family)
    ours = {name: tensor.detach() for name, tensor in model_tensors(model).items()}
    # A tied lm_head is not written
    decoder = {key: ours[names[0]] for key, names in llm_key_map(cfg).items()}
    video = {name: tensor for name, tensor in ours.items() if name.startswith(VIDEO_PREFIXES)}
    return (family_config(cfg, family, dtype_name(ours["decoder.embed_tokens.weight"])), decoder,
            video)


def pick_family(cfg, family):
    """Qwen2 always has q/k/v biases, Llama and Mistral never: the biases decide unless the caller
    names a family (Mistral: the decoder of a Mistral checkpoint, which is a Llama decoder without
    a sliding window here)."""
    family = family or ("qwen2" if cfg.qkv_bias else "llama")
    if family not in LLM_TYPES:
        raise ValueError(f"family must be one of {', '.join(LLM_TYPES)}; got {family!r}")
    if (family == "qwen2") != cfg.qkv_bias:
        raise ValueError(f"family={family!r} does not fit a decoder "
                         f"{'with' if cfg.qkv_bias else 'without'} q/k/v "
                         f"biases: qwen2 has them, llama and mistral do not")
    return family


def family_config(cfg, family, dtype):
    """The decoder's config.json as its family's transformers config class writes it. The rope goes
    in as transformers 4 wrote it (top-level rope_theta, rope_scaling): transformers 5 reads that
    form as well, while readers of the older form would miss a rope_parameters entry and fall back
    to theta 10000."""
    scaling = None
    if cfg.rope_factor != 1.0:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    return {"architectures": [ARCHITECTURES[family]], "model_type": family,
            **{theirs: getattr(cfg, ours) for theirs, ours in HF_FIELDS.items()},
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dim_per_head,
            "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
            "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
            "dtype": dtype, "torch_dtype": dtype,  # transformers 5's name for it, then 4's
            **FAMILY_SWITCHES[family]}


# ============================================================================================
# The release's layout
# ============================================================================================

# What the release's code fixes whatever config.json says: VideoTokenizer's constants, the video
# preprocessor config its config.json names (448px, patch 14, LSD window 2), constants.py's
# CHUNK_SIZE, no ablation switches, and transformers 4.31's Llama (no q/k/v biases, rope_theta
# fixed at 10000, no rope scaling in Llama 3's form).
RELEASE_FIXED = {"image_size": 448, "patch_size": 14, "lsd_window": 2, "chunk_frames": 4,
                 "lste_reduction": 1.5, "gstra_mlp_ratio": 4, "split_tokens": True, "fsra": True,
                 "lsd": "attention", "lste": True, "gstra": True, "qkv_bias": False,
                 "rope_theta": 10000.0, "rope_factor": 1.0}
# The STAB widths VideoTokenizer accepts, and its heads for each
RELEASE_STAB_HEADS = {1024: 8, 1152: 8, 1408: 11}
# Relative to the release's root
RELEASE_VIDEO_TOWER = "videopanda/config/videopanda-video-LB-patch14-anypixel-448"
RELEASE_VISION_TOWER = "videopanda/config/videopanda-vision-LB-patch14-anypixel-448"


def release_export(model):
    """(config.json, tensors) in the release's layout: its key names, GSTRA's q and kv packed back
    into one in_proj, temporal_cls_token as (1, 1, C), the STAB and projector under both of their
    names, an idle lmhra2, and each layer's rotary inv_freq, which transformers 4.31 keeps in the
    state dict: every key its model has."""
    cfg = model.cfg
    problems = release_problems(cfg)
    if problems:
        raise ValueError(f"the release's code cannot build this model: {'; '.join(problems)}")
    ours = {name: tensor.detach() for name, tensor in model_tensors(model).items()}
    tensors = {}
    for key, names in official_key_map(model).items():
        tensor = torch.cat([ours[n] for n in names]) if len(names) > 1 else ours[names[0]]
        tensors[key] = tensor.view(1, 1, -1) if key in UNSQUEEZED else tensor
    tensors |= idle_lmhra2(tensors)
    # Copies, not views: a safetensors file holds no shared storage
    for alias, original in OFFICIAL_ALIASES.items():
        tensors |= {alias + key[len(original):]: t.clone() for key, t in tensors.items()
                    if key.startswith(original)}
    embed = ours["decoder.embed_tokens.weight"]
    tensors |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq":
                rope_inv_freq(cfg).to(embed.dtype) for i in range(cfg.n_layers)}
    return release_config(cfg, dtype_name(embed)), tensors


def release_problems(cfg):
    """What in cfg the release's code could not build, one phrase each; empty when it can."""
    problems = [f"{name}={getattr(cfg, name)!r} (the release has {value!r})"
                for name, value in RELEASE_FIXED.items() if getattr(cfg, name) != value]
    if RELEASE_STAB_HEADS.get(cfg.stab_dim) != cfg.stab_heads:
        problems.append(f"stab_dim={cfg.stab_dim} with stab_heads={cfg.stab_heads} (the release "
                        f"builds widths 1024 and 1152 with 8 heads, 1408 with 11)")
    if cfg.dim_per_head * cfg.n_heads != cfg.d_model:
        problems.append(f"head_dim={cfg.head_dim} (transformers 4.31's Llama has head_dim = "
                        f"hidden_size / heads)")
    return problems


def idle_lmhra2(tensors):
    """The release's second LSTE branch, which its forward never calls but its state dict holds (so
    its code loads strictly only with it). Written as a branch that was never trained and outputs
    zero: BatchNorm at PyTorch's defaults (weight and running variance 1, the rest 0), every
    convolution zero. Not a copy of lmhra1: nothing depends on these values, and a copy would
    suggest a second trained branch."""
    first, ones = "model.video_tower.lmhra1.", ("pos_embed.0.weight", "pos_embed.0.running_var")
    idle = {}
    for key, tensor in tensors.items():
        if key.startswith(first):
            fill = torch.ones_like if key.endswith(ones) else torch.zeros_like
            idle["model.video_tower.lmhra2." + key[len(first):]] = fill(tensor)
    return idle


def release_config(cfg, dtype):
    """config.json as the release's VideoPandaLlamaForCausalLM reads it: a Llama config
    (transformers 4.31) plus the fields its VideoPandaMetaModel, model/builder.py and evaluation
    scripts read. requires_video_distill is false because the export holds no distillation head or
    teacher: the release's model then has exactly the keys written here."""
    return {"architectures": ["VideoPandaLlamaForCausalLM"], "model_type": "videopanda",
            **{theirs: getattr(cfg, ours) for theirs, ours in HF_FIELDS.items()},
            "num_key_value_heads": cfg.n_kv_heads, "hidden_act": "silu", "rope_scaling": None,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
            "mm_video_tower": RELEASE_VIDEO_TOWER, "video_hidden_size": cfg.stab_dim,
            # mm_hidden_size makes vision_tower an alias
            "mm_vision_tower": RELEASE_VISION_TOWER, "mm_hidden_size": cfg.stab_dim,
            "mm_projector_type": "mlp2x_gelu", "use_mm_proj": True,
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "tune_mm_mlp_adapter": False,
            "requires_video_distill": False, "requires_image_distill": False,
            # read once distillation is switched on
            "video_tower_teacher": "LanguageBind/LanguageBind_Video_merge",
            "mm_vision_tower_teacher": "LanguageBind/LanguageBind_Image"}


# ============================================================================================
# Files
# ============================================================================================

SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
              "GIB": 2 ** 30}


def shard_bytes(size):
    """max_shard_size in bytes: an int, or a string such as "5GB" (10^9 bytes, as transformers
    counts) or "2GiB"."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)\s*", str(size), re.IGNORECASE)
    if not match or int(match[1]) == 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes such as 5GB, 500MB or "
                         f"2GiB; got {size!r}")
    return int(match[1]) * SIZE_UNITS[match[2].upper()]


def write_weights(folder, tensors, max_bytes):
    """model.safetensors, or, once the tensors exceed max_bytes, model-0000i-of-0000n.safetensors
    shards and model.safetensors.index.json (transformers' names). Shards are filled in key order;
    a shard exceeds max_bytes only when one tensor alone does."""
    shards, size = [[]], 0
    for key, tensor in tensors.items():
        n = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        save_tensors(folder / "model.safetensors", tensors)
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        save_tensors(folder / name, {key: tensors[key] for key in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_tensors(file, tensors):
    """One safetensors file, copied to the CPU one file at a time. transformers reads a safetensors
    file only if its metadata says "format": "pt"."""
    save_file({key: t.detach().cpu().contiguous() for key, t in tensors.items()}, file,
              metadata={"format": "pt"})


def write_json(file, value):
    """value as indented JSON, the way transformers writes config.json."""
    file.write_text(json.dumps(value, indent=2) + "\n")


def dtype_name(tensor):
    """"bfloat16" for a torch.bfloat16 tensor: the name config.json records."""
    return str(tensor.dtype).removeprefix("torch.")


def replace_directory(path, overwrite, write):
    """write(folder) fills a new temporary directory beside path, which is then renamed onto path: a
    reader finds the old directory, none, or the new one, never a mix."""
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The same filesystem: renames are atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = tmp.with_name(tmp.name + "-old")
    try:
        write(tmp)
        # An export is meant to be read by others, but mkdtemp makes the directory private to its
        # owner, and so does safetensors each file it writes.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if path.exists():
            # A directory cannot be renamed onto a non-empty one: move the old aside
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_target(path, overwrite):
    """Refuse to replace anything but nothing, an empty directory or one of our exports, unless
    overwrite=True."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if (not path.exists() or not any(path.iterdir()) or overwrite
            or (path / PANDA_CONFIG).is_file()):
        return  # nothing there, or one of our exports, which may be replaced without asking
    raise FileExistsError(f"{path} is a non-empty directory that is not a panda export (it has "
                          f"no {PANDA_CONFIG}); pass overwrite=True to replace it and everything "
                          f"in it")
