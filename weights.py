"""Checkpoints in and out: Hugging Face Llama-family LLMs, the released Video-Panda-7B, and our own exports.

    model, tokenizer = from_pretrained("path/to/local/dir")   # nothing is ever downloaded
    save_pretrained(model, tokenizer, "out/my-export")

from_pretrained reads config.json and goes by its model_type:
  llama, mistral, qwen2  a decoder-only LLM (Vicuna, Llama 2/3, TinyLlama, SmolLM, Mistral, Qwen2): its weights
                         fill the decoder; the STAB and projector are new, initialised as their constructors do
  videopanda             the official release (jh-yi/Video-Panda-7B: videopanda_fitu or videopanda_prtr1)
  panda                  a directory written by save_pretrained

Every load is strict: a key the checkpoint should not have, a key it lacks, or a tensor of the wrong shape is a
CheckpointError naming the key. The only keys skipped are derived buffers and, in the release, the documented
duplicates and training-only weights (OFFICIAL_DROPPED, OFFICIAL_ALIASES).
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from panda import PandaConfig, VideoPanda

LLM_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = LLM_TYPES + ("videopanda", "panda")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",  # looked for in this order
                "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it should fill."""


# ============================================================================================
# config.json -> PandaConfig
# ============================================================================================

# Hugging Face config field -> PandaConfig field, for the fields that map one to one (read and written).
HF_FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
             "intermediate_size": "ffn_dim", "rms_norm_eps": "rms_eps", "vocab_size": "vocab_size",
             "max_position_embeddings": "max_seq_len"}


def read_config(path):
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: from_pretrained needs a local Hugging Face-style directory")
    hf = json.loads(file.read_text())
    if hf.get("model_type") not in SUPPORTED_TYPES:
        raise ValueError(f"{file}: model_type {hf.get('model_type')!r} is not supported; supported model types: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    return hf


def decoder_fields(hf, file="config.json"):
    """The decoder's PandaConfig fields from a Llama/Mistral/Qwen2 config.json (either rope layout)."""
    missing = [k for k in HF_FIELDS if k not in hf]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
        raise ValueError(f"{file}: panda's decoder has a SiLU-gated MLP without biases; found hidden_act="
                         f"{hf.get('hidden_act')!r}, mlp_bias={hf.get('mlp_bias')}")
    if hf.get("attention_bias", False):  # Qwen2's q/k/v biases are implied by its model_type, not this field
        raise ValueError(f"{file}: attention_bias=true puts a bias on o_proj as well, which panda's decoder lacks")
    out = {ours: hf[theirs] for theirs, ours in HF_FIELDS.items()}
    heads = hf["num_attention_heads"]
    out["n_kv_heads"] = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or 0
    out["head_dim"] = 0 if head_dim == hf["hidden_size"] // heads else head_dim  # 0 = "the usual", as PandaConfig says
    out["tie_embeddings"] = hf.get("tie_word_embeddings", False)
    out["qkv_bias"] = hf["model_type"] == "qwen2"  # Qwen2 always has q/k/v biases, and none on o_proj
    # Mistral's sliding_window is on whenever set; Qwen2's only with use_sliding_window.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", hf["model_type"] == "mistral") else None
    if window and window < out["max_seq_len"]:
        # Mistral v0.1 attends to the last 4096 tokens only; panda attends to all, so the two agree up to there.
        out["max_seq_len"] = window
    return out | rope_fields(hf, file)


def rope_fields(hf, file):
    """transformers v5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}}; older files write a
    top-level rope_theta and "rope_scaling": null or {"type" (or "rope_type"): ..., "factor": ...}."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind != "llama3":
        raise ValueError(f"{file}: rope type {kind!r} is not supported; panda's decoder does 'default' and 'llama3'")
    return out | {"rope_factor": float(rope["factor"]), "rope_low_freq_factor": float(rope["low_freq_factor"]),
                  "rope_high_freq_factor": float(rope["high_freq_factor"]),
                  "rope_original_max_len": rope.get("original_max_position_embeddings", hf["max_position_embeddings"])}


def config_from_hf(hf, preset="paper", **overrides):
    """Decoder fields from a Hugging Face config; video and STAB fields from the preset; then the caller's overrides."""
    return PandaConfig.preset(preset, **(decoder_fields(hf) | overrides))


def saved_config(hf, file, **overrides):
    saved = hf.get("panda_config", {})
    unknown = set(saved) - {f.name for f in fields(PandaConfig)}
    if unknown:
        raise ValueError(f"{file}: panda_config has fields this PandaConfig does not know: {sorted(unknown)}")
    return PandaConfig(**(saved | overrides))


# ============================================================================================
# Key tables: checkpoint key -> the names of our tensors it fills
# ============================================================================================
# One checkpoint tensor usually fills one of ours. When it fills several (the release's packed GSTRA q/k/v), the
# checkpoint tensor is our tensors concatenated along dim 0, in the order listed.

LAYER_TENSORS = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
QKV_BIASES = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]


def llm_key_map(cfg):
    """Our decoder keeps Hugging Face's names, under `decoder.` instead of `model.`. No permutation of q_proj or
    k_proj is needed: Hugging Face Llama checkpoints store them in the rotate-half layout our decoder uses."""
    table = {"model.embed_tokens.weight": ["decoder.embed_tokens.weight"], "model.norm.weight": ["decoder.norm.weight"]}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = ["decoder.lm_head.weight"]
    for i in range(cfg.n_layers):
        for name in LAYER_TENSORS + (QKV_BIASES if cfg.qkv_bias else []):
            table[f"model.layers.{i}.{name}"] = [f"decoder.layers.{i}.{name}"]
    return table


# Release module under model.video_tower. -> our module under stab.; the tensor names below them are the same.
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
OFFICIAL_STAB_TENSORS = {"class_embedding": "fsra.query", "split_embedding": "split_token", "balance": "balance",
                         "temporal_cls_token": "gstra.query"}
UNSQUEEZED = {"model.video_tower.temporal_cls_token"}  # the release stores GSTRA's query as (1, 1, C)
OFFICIAL_DROPPED = (
    "model.video_tower.lmhra2.", "model.vision_tower.lmhra2.",  # a second LSTE branch the release never calls
    "model.video_tower_compressor.",  # distillation head, training only (it holds an alias of the teacher too)
    "model.video_teacher.",           # the frozen LanguageBind teacher, training only
)
# The release registers its STAB and projector under two names each, so every tensor is stored twice.
OFFICIAL_ALIASES = {"model.vision_tower.": "model.video_tower.", "model.mm_projector.": "model.video_projector."}


def official_key_map(model):
    """Every key of the release (spec F.2) that we load, built from our own module tree so the names are exact."""
    table = {}
    for theirs, ours in OFFICIAL_STAB_MODULES.items():
        for name in model.stab.get_submodule(ours).state_dict():
            table[f"model.video_tower.{theirs}.{name}"] = [f"stab.{ours}.{name}"]
    for theirs, ours in OFFICIAL_STAB_TENSORS.items():
        table[f"model.video_tower.{theirs}"] = [f"stab.{ours}"]
    # nn.MultiheadAttention packs rows [Q; K; V]; our query and key/value projections are separate, kv rows [K; V].
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
        shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{file} names shards that are not in {path}: {absent}")
        return [path / s for s in shards]
    raise FileNotFoundError(f"no weights in {path}: looked for {', '.join(WEIGHT_FILES)}")


def read_tensors(files):
    """Yield (file, key, tensor), one shard at a time, so that at most one shard is held besides the model."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield file.name, key, f.get_tensor(key)
        else:  # mmap: the shard stays on disk and pages in as each tensor is copied
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key in list(state):
                yield file.name, key, state.pop(key)


def model_tensors(model):
    """Our parameters and persistent buffers by name; a tied lm_head counts once, as the embedding."""
    tensors = model.state_dict(keep_vars=True)
    if model.cfg.tie_embeddings:
        del tensors["decoder.lm_head.weight"]
    return tensors


def load_into(model, path, stream, table, fresh=()):
    """Copy every (file, key, tensor) of `stream` into the tensors table[key] names. All our tensors must be
    filled except those under the `fresh` prefixes; anything unexpected, missing or mis-shaped is an error."""
    ours = model_tensors(model)
    covered = {name for names in table.values() for name in names}
    uncovered = [n for n in ours if n not in covered and not n.startswith(fresh)]
    if uncovered:  # a bug here, not in the checkpoint: panda.py has tensors this file does not know about
        raise RuntimeError(f"weights.py's key table does not cover {uncovered}")
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
        raise CheckpointError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(want)}")
    pieces = tensor.reshape(-1).split([t.numel() for t in targets])  # row-major: a split of dim 0
    with torch.no_grad():
        for target, piece in zip(targets, pieces):
            target.copy_(piece.view(target.shape))  # casts to the model's dtype and moves to its device


def without_derived(stream, cfg):
    for file, key, tensor in stream:
        if key.endswith("rotary_emb.inv_freq"):  # older transformers saved it; it follows from the config
            continue
        if cfg.tie_embeddings and key == "lm_head.weight":  # some tied checkpoints store the head anyway
            continue
        yield file, key, tensor


def official_stream(stream, aliases):
    """Drop the release's training-only weights; set its alias copies aside (appended to `aliases`)."""
    for file, key, tensor in stream:
        if key.startswith(OFFICIAL_DROPPED):
            continue
        alias = next((a for a in OFFICIAL_ALIASES if key.startswith(a)), None)
        if alias:
            aliases.append((file, key, OFFICIAL_ALIASES[alias] + key[len(alias):], tensor))
            continue
        yield file, key, tensor


def check_aliases(model, path, aliases, table):
    """Each alias copy must equal what its video_* original loaded (both went through the same cast)."""
    ours = model_tensors(model)
    for file, key, original, tensor in aliases:
        if original not in table:
            raise CheckpointError(f"{path / file}: unexpected key {key!r}")
        loaded = torch.cat([ours[n].detach().reshape(-1) for n in table[original]])
        if tensor.numel() != loaded.numel() or not torch.equal(tensor.reshape(-1).to(loaded), loaded):
            raise CheckpointError(f"{path / file}: {key!r} should be a copy of {original!r} but differs")


def empty_model(cfg, dtype, device, fresh_visual):
    """VideoPanda(cfg) with uninitialised storage: a 7B decoder is never randomly initialised only to be
    overwritten, and never held twice. With fresh_visual, the STAB and projector get their constructors' init."""
    with torch.device("meta"):
        model = VideoPanda(cfg)  # shapes only: no memory, no init work
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives every parameter its own new storage, which unties them
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    if fresh_visual:  # a donor with a one-token, zero-layer decoder runs the real STAB and projector constructors
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
    return Tokenizer.from_file(str(file))


# ============================================================================================
# The public API
# ============================================================================================

def from_pretrained(path, dtype=None, device="cpu", preset="paper", tokenizer_path=None, **config_overrides):
    """Load a local checkpoint directory -> (VideoPanda in eval mode, tokenizers.Tokenizer or None).

    dtype defaults to bfloat16 on CUDA and float32 elsewhere. For LLM checkpoints (and the release) the STAB and
    video geometry come from `preset` ("paper": 8 frames of 448px, STAB width 1024), the decoder from config.json;
    config_overrides (e.g. n_frames=8, grad_checkpoint=True) go last. For a panda export the saved config is used.

    The tokenizer is tokenizer_path (a tokenizer.json, or a directory holding one), else <path>/tokenizer.json,
    else None. The release is tokenised with Vicuna-7B-v1.5's SentencePiece tokenizer and may ship no
    tokenizer.json; neither does lmsys/vicuna-7b-v1.5 on the Hub (tokenizer.model only). Make one once, on a
    machine with transformers and sentencepiece:
        AutoTokenizer.from_pretrained("lmsys/vicuna-7b-v1.5").save_pretrained("vicuna-tokenizer")
    and pass tokenizer_path="vicuna-tokenizer" (or copy its tokenizer.json next to config.json). That is the
    fast tokenizer converted from tokenizer.model; the release ran the slow one (use_fast=False), and the two
    can differ in corner cases (spaces next to special tokens).
    """
    path = Path(path)
    hf = read_config(path)
    kind = hf["model_type"]
    if kind == "panda":
        cfg = saved_config(hf, path / "config.json", **config_overrides)
    else:
        cfg = config_from_hf(hf, preset, **config_overrides)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model = empty_model(cfg, dtype, device, fresh_visual=kind in LLM_TYPES)
    stream = read_tensors(weight_files(path))
    if kind in LLM_TYPES:
        load_into(model, path, without_derived(stream, cfg), llm_key_map(cfg), fresh=("stab.", "projector."))
    elif kind == "videopanda":
        table, aliases = official_key_map(model), []
        load_into(model, path, official_stream(without_derived(stream, cfg), aliases), table)
        check_aliases(model, path, aliases, table)
    else:
        load_into(model, path, stream, {name: [name] for name in model_tensors(model)})
    return model.eval(), read_tokenizer(path, tokenizer_path)


def save_pretrained(model, tokenizer, path, overwrite=False):
    """Write config.json, model.safetensors (our names, tied weights once) and tokenizer.json (when given).
    The export is built in a temporary directory and renamed into place, so a reader finds the old export,
    none, or the new one, never a mix. A non-empty directory that is not a panda export is only replaced
    (with everything in it) when overwrite=True."""
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))  # same filesystem: renames are atomic
    tmp.chmod(0o755)  # mkdtemp makes it private to its owner; an export is meant to be read by others
    old = tmp.with_name(tmp.name + "-old")
    try:
        tensors = {name: t.detach().cpu().contiguous() for name, t in model_tensors(model).items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(export_config(model.cfg, dtype), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        if path.exists():
            os.replace(path, old)  # a directory cannot be renamed onto a non-empty one: move the old aside
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_target(path, overwrite):
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not path.exists() or not any(path.iterdir()) or overwrite:
        return
    try:  # a previous panda export may be replaced without asking
        if json.loads((path / "config.json").read_text()).get("model_type") == "panda":
            return
    except (OSError, ValueError):
        pass
    raise FileExistsError(f"{path} is a non-empty directory that is not a panda export; pass overwrite=True to "
                          f"replace it and everything in it")


def export_config(cfg, dtype):
    """model_type "panda" with the whole PandaConfig (what from_pretrained reads back), plus the decoder in
    Llama's terms so that the file describes itself. q/k/v biases, if any, are only in panda_config (qkv_bias):
    Llama's attention_bias would also mean one on o_proj."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor != 1.0:
        rope |= {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                 "high_freq_factor": cfg.rope_high_freq_factor,
                 "original_max_position_embeddings": cfg.rope_original_max_len}
    return {"model_type": "panda", "architectures": ["VideoPanda"], "panda_config": asdict(cfg),
            **{theirs: getattr(cfg, ours) for theirs, ours in HF_FIELDS.items()},
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dim_per_head, "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope, "dtype": dtype}
