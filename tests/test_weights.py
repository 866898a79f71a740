"""Tests of checkpoints/checkpoint_dirs.py: Hugging Face Llama-family checkpoints, the release's layout, our exports in both layouts,
and checkpoints/export.py. transformers is a test-only dependency: it writes the reference checkpoints, computes the
reference outputs and loads our Hugging Face-layout exports as any user of the base LLM would."""

import json
import logging
from dataclasses import asdict
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from tools import cli

from checkpoints import run_files
from checkpoint_files import write_bin
from panda import VIDEO_PLACEHOLDER, KVCache, PandaConfig, VideoPanda, rope_inv_freq
from checkpoints import export as export_tool
from checkpoints.checkpoint_dirs import CheckpointError, config_from_hf, from_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

TINY_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=128, max_position_embeddings=4096, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # wavelengths of 16..64 tokens get smoothed: all 3 branches


def hf_model(kind):
    """A tiny random Hugging Face model. HF starts biases at 0 and norms at 1; every tensor is made distinct so
    that a mis-mapped tensor cannot go unnoticed."""
    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention, untied head
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLM))
    elif kind == "llama3":
        rope = dict(LLAMA3_ROPE)  # a copy: HF adds rope_theta to the dict it is given
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLM, rope_scaling=rope))
    elif kind == "qwen2":  # q/k/v biases, tied head
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_LLM, tie_word_embeddings=True))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY_LLM))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(("norm" in name) + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_hf(model, path, layout):
    """Hugging Face's own writer for safetensors. transformers 5 writes no .bin any more (save_pretrained
    ignores safe_serialization=False), so the .bin layouts are written as transformers 4 did."""
    if layout == "safetensors":
        model.save_pretrained(path)
    elif layout == "safetensors-sharded":
        model.save_pretrained(path, max_shard_size="40KB")
        assert len(list(path.glob("model-*.safetensors"))) > 2
    else:
        model.config.save_pretrained(path)
        write_bin(model.state_dict(), path, shards=1 if layout == "bin" else 2)


def our_logits(model, ids):
    dec = model.decoder
    return dec.lm_head(dec(dec.embed_tokens(ids), torch.arange(ids.shape[1])[None]))


def our_greedy(decoder, ids, n):
    """Greedy decoding with panda's KV cache, one position per step, as VideoPanda.stream does."""
    L = ids.shape[1]
    cache, slots = KVCache(decoder.cfg, 1, L + n, torch.float32, "cpu"), torch.arange(L + n)
    h = decoder(decoder.embed_tokens(ids), slots[None, :L], cache=cache, slots=slots[:L])
    out = []
    for step in range(n):
        out.append(decoder.lm_head(h[:, -1]).argmax(-1))
        seen = (slots <= L + step)[None]  # (1, slots): the prompt and the new tokens so far
        h = decoder(decoder.embed_tokens(out[-1][:, None]), slots[None, L + step:L + step + 1], visible=seen,
                    cache=cache, slots=slots[L + step:L + step + 1])
    return torch.stack(out, 1)


# --------------------------------------------------------------------------- Hugging Face LLM checkpoints

@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "mistral"])
def test_decoder_logits_match_hugging_face(kind, layout, tmp_path):
    hf = hf_model(kind)
    save_hf(hf, tmp_path, layout)
    model, tokenizer = from_pretrained(tmp_path, preset="nano")  # a tiny STAB: this test is about the decoder
    assert tokenizer is None and not model.training
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (64, 2, 4, 2, 128)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == (kind == "qwen2")
    if cfg.tie_embeddings:
        assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    torch.testing.assert_close(rope_inv_freq(model.cfg), hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(our_logits(model, ids), hf(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2"])
def test_greedy_generation_matches_hugging_face(kind, tmp_path):
    hf = hf_model(kind)
    save_hf(hf, tmp_path, "safetensors")
    model, _ = from_pretrained(tmp_path, preset="nano")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None  # never stop early: compare all 12 tokens
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 10:]
    with torch.no_grad():
        assert torch.equal(our_greedy(model.decoder, ids, 12), expected)


def test_fresh_stab_and_projector_are_initialised_by_their_constructors(tmp_path):
    save_hf(hf_model("llama"), tmp_path, "safetensors")
    torch.manual_seed(7)
    model, _ = from_pretrained(tmp_path, preset="nano")
    torch.manual_seed(7)
    reference = VideoPanda(model.cfg)
    for part in ("stab", "projector"):
        for name, tensor in getattr(reference, part).state_dict().items():
            assert torch.equal(getattr(model, part).state_dict()[name], tensor), f"{part}.{name}"


def test_old_and_new_rope_layouts_give_the_same_config():
    base = dict(TINY_LLM, model_type="llama")
    new = base | {"rope_parameters": dict(LLAMA3_ROPE, rope_theta=500000.0)}
    old_scaling = {k.replace("rope_type", "type"): v for k, v in LLAMA3_ROPE.items()}
    old = base | {"rope_theta": 500000, "rope_scaling": old_scaling}
    assert config_from_hf(new) == config_from_hf(old)
    assert (config_from_hf(old).rope_theta, config_from_hf(old).rope_factor) == (500000.0, 8.0)
    plain_new = base | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert config_from_hf(plain_new) == config_from_hf(base | {"rope_scaling": None}) == config_from_hf(base)
    with pytest.raises(ValueError, match="rope type 'linear'.*'default' and 'llama3'"):
        config_from_hf(base | {"rope_scaling": {"type": "linear", "factor": 4.0}})


def test_llm_checkpoint_with_a_missing_or_misshaped_key_names_it(tmp_path):
    hf = hf_model("llama")
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key.*'lm_head.weight'"):
        from_pretrained(tmp_path, preset="nano")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 60)
    save_file(state, tmp_path / "model.safetensors")
    message = r"'model.layers.1.mlp.up_proj.weight' has shape \(128, 60\), expected \(128, 64\)"
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path, preset="nano")


# --------------------------------------------------------------------------- the release's layout

C, R = 1024, 682  # STAB width as released; LSTE bottleneck int(1024 // 1.5)


def official_stab_shapes():
    """model.video_tower.* keys and shapes of the release's state dict (its VideoTokenizer), written out by hand."""
    shapes = {"class_embedding": (C,), "split_embedding": (C,), "temporal_cls_token": (1, 1, C), "balance": (C,),
              "patch_embedding.weight": (C, 3, 14, 14), "dpe.weight": (C, 1, 3, 3, 3), "dpe.bias": (C,),
              "dec.attn.in_proj_weight": (3 * C, C), "dec.attn.in_proj_bias": (3 * C,),
              "dec.attn.out_proj.weight": (C, C), "dec.attn.out_proj.bias": (C,),
              "dec.mlp.c_fc.weight": (4 * C, C), "dec.mlp.c_fc.bias": (4 * C,),
              "dec.mlp.c_proj.weight": (C, 4 * C), "dec.mlp.c_proj.bias": (C,),
              "proj.0.weight": (C,), "proj.0.bias": (C,), "proj.2.weight": (C, C), "proj.2.bias": (C,)}
    shapes |= {f"dec.ln_{i}.{t}": (C,) for i in (1, 2, 3) for t in ("weight", "bias")}
    for branch in ("lmhra1", "lmhra2"):
        shapes |= {f"{branch}.pos_embed.0.{t}": (C,) for t in ("weight", "bias", "running_mean", "running_var")}
        shapes |= {f"{branch}.pos_embed.0.num_batches_tracked": (), f"{branch}.pos_embed.1.weight": (R, C, 1, 1, 1),
                   f"{branch}.pos_embed.1.bias": (R,), f"{branch}.pos_embed.2.weight": (R, 1, 3, 1, 1),
                   f"{branch}.pos_embed.2.bias": (R,), f"{branch}.pos_embed.3.weight": (C, R, 1, 1, 1),
                   f"{branch}.pos_embed.3.bias": (C,)}
    for attn in ("local_attention", "global_attention"):
        shapes |= {f"{attn}.q.0.weight": (C,), f"{attn}.q.0.bias": (C,), f"{attn}.q.1.weight": (C, C),
                   f"{attn}.kv.0.weight": (C,), f"{attn}.kv.0.bias": (C,), f"{attn}.kv.1.weight": (2 * C, C),
                   f"{attn}.proj.weight": (C, C), f"{attn}.proj.bias": (C,)}
    return shapes


def official_state():
    """A fake release checkpoint in bf16: random STAB at full width, tiny Llama decoder, the alias duplicates
    (sharing storage, as the release's aliased modules do), lmhra2, and some compressor and teacher keys."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in official_stab_shapes().items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(1234)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        else:  # norm weights (BatchNorm, LayerNorms) near 1, everything else near 0
            is_norm_weight = key.endswith(".0.weight") or key.startswith("dec.ln_") and key.endswith(".weight")
            value = 0.02 * torch.randn(shape, generator=g) + is_norm_weight
        state[f"model.video_tower.{key}"] = value
    for name, shape in {"0.weight": (64, C), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)}.items():
        state[f"model.video_projector.{name}"] = 0.02 * torch.randn(shape, generator=g)
    state = {k: v if v.dtype == torch.int64 else v.bfloat16() for k, v in state.items()}
    state |= {k.replace("model.video_", "model.vision_").replace("vision_projector", "mm_projector"): v
              for k, v in state.items()}
    state |= {k: v.bfloat16() for k, v in hf_model("llama").state_dict().items()}
    for key in ("model.video_tower_compressor.norm_layer.0.0.weight", "model.video_tower_compressor.input_layer.weight",
                "model.video_tower_compressor.teacher_layer.video_tower.embeddings.class_embedding",
                "model.video_teacher.video_tower.embeddings.class_embedding",
                "model.video_teacher.video_tower.encoder.layers.0.temporal_embedding"):
        state[key] = torch.randn(8, generator=g).bfloat16()
    return state


def write_official(state, path, shards=2):
    path.mkdir()
    config = dict(TINY_LLM, model_type="videopanda", architectures=["VideoPandaLlamaForCausalLM"], rope_scaling=None,
                  tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.31.0",
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=C, mm_vision_tower="videotokenizer")
    (path / "config.json").write_text(json.dumps(config))
    write_bin(state, path, shards)
    return path


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    state = official_state()
    return state, write_official(state, tmp_path_factory.mktemp("release") / "fitu")


@pytest.fixture(scope="module")
def official(official_dir):
    state, path = official_dir
    model, _ = from_pretrained(path)
    return state, model


def test_official_checkpoint_loads_with_the_paper_geometry_and_runs_end_to_end(official):
    state, model = official
    cfg = model.cfg
    geometry = (cfg.n_frames, cfg.image_size, cfg.patch_size, cfg.chunk_frames, cfg.stab_dim, cfg.stab_heads)
    assert geometry == (8, 448, 14, 4, C, 8) and cfg.d_model == 64
    video = torch.cat([torch.randn(1, 8, 3, 448, 448, generator=torch.Generator().manual_seed(0)),
                       torch.ones(1, 8, 1, 448, 448)], 2)
    ids = torch.tensor([[1, 5, 9, VIDEO_PLACEHOLDER, 17, 3]])
    out = model.generate(video, ids, max_new_tokens=3)  # the one run of the full-size STAB: 2184 visual tokens
    assert out.shape == (1, 3) and bool(((out >= 0) & (out < 128)).all())


# official key under model.video_tower. -> ours under stab., restated here independently of checkpoints/checkpoint_dirs.py
RENAMED = {"class_embedding": "fsra.query", "split_embedding": "split_token", "balance": "balance",
           "patch_embedding.weight": "patch_embed.weight", "lmhra1.pos_embed.0.weight": "lste.norm.weight",
           "lmhra1.pos_embed.0.running_mean": "lste.norm.running_mean",
           "lmhra1.pos_embed.0.running_var": "lste.norm.running_var",
           "lmhra1.pos_embed.0.num_batches_tracked": "lste.norm.num_batches_tracked",
           "lmhra1.pos_embed.1.weight": "lste.reduce.weight", "lmhra1.pos_embed.2.weight": "lste.temporal.weight",
           "lmhra1.pos_embed.3.bias": "lste.expand.bias", "dpe.weight": "lste.dpe.weight",
           "dec.ln_2.bias": "gstra.norm.bias", "dec.mlp.c_fc.weight": "gstra.mlp.0.weight",
           "dec.mlp.c_proj.weight": "gstra.mlp.3.weight", "proj.0.weight": "fuse.0.weight",
           "proj.2.weight": "fuse.2.weight", "local_attention.kv.1.weight": "lsd.attn.kv.1.weight",
           "local_attention.q.0.bias": "lsd.attn.q.0.bias", "global_attention.q.1.weight": "fsra.attn.q.1.weight",
           "global_attention.proj.bias": "fsra.attn.proj.bias"}


def test_official_keys_land_on_the_right_tensors(official):
    state, model = official
    ours = model.state_dict()
    for theirs, name in RENAMED.items():
        expected = state["model.video_tower." + theirs]
        assert torch.equal(ours["stab." + name], expected.to(ours["stab." + name].dtype)), theirs
    assert torch.equal(ours["projector.2.weight"], state["model.video_projector.2.weight"].float())
    k_proj = "layers.1.self_attn.k_proj.weight"
    assert torch.equal(ours["decoder." + k_proj], state["model." + k_proj].float())


def official_gstra(state, tokens):
    """The release's GSTRA (UniFormerV2 Extractor) from its own weights, through nn.MultiheadAttention."""
    prefix = "model.video_tower.dec."
    p = {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
    mha = torch.nn.MultiheadAttention(C, 8, batch_first=True)
    mha.load_state_dict({"in_proj_weight": p["attn.in_proj_weight"], "in_proj_bias": p["attn.in_proj_bias"],
                         "out_proj.weight": p["attn.out_proj.weight"], "out_proj.bias": p["attn.out_proj.bias"]})
    ln = lambda x, i: F.layer_norm(x, (C,), p[f"ln_{i}.weight"], p[f"ln_{i}.bias"])
    query = state["model.video_tower.temporal_cls_token"].float().expand(tokens.shape[0], 1, C)
    keys = ln(tokens, 3)
    x = query + mha(ln(query, 1), keys, keys, need_weights=False)[0]
    h = F.linear(ln(x, 2), p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    return (x + F.linear(h * torch.sigmoid(1.702 * h), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"]))[:, 0]


def test_official_gstra_in_proj_rows_land_in_q_and_kv(official):
    state, model = official
    tokens = torch.randn(2, 64, C, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.stab.gstra(tokens), official_gstra(state, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ("drop model.video_tower.dec.ln_3.bias", r"missing key.*'model.video_tower.dec.ln_3.bias'"),
    ("add model.video_tower.mystery.weight", r"unexpected key 'model.video_tower.mystery.weight'"),
    ("add model.vision_tower.mystery.weight", r"unexpected key 'model.vision_tower.mystery.weight'"),
    ("reshape model.video_tower.dec.attn.in_proj_weight",
     r"'model.video_tower.dec.attn.in_proj_weight' has shape \(3072, 1000\), expected \(3072, 1024\)"),
    ("alter model.mm_projector.0.bias",
     r"'model.mm_projector.0.bias' should be a copy of 'model.video_projector.0.bias'"),
])
def test_official_checkpoint_errors_name_the_key(change, message, official, tmp_path):
    state = dict(official[0])
    verb, key = change.split()
    if verb == "drop":
        del state[key]
    elif verb == "add":
        state[key] = torch.zeros(3)
    elif verb == "reshape":
        state[key] = torch.zeros(3072, 1000)
    else:
        state[key] = state[key] + 1
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(write_official(state, tmp_path / "ckpt", shards=1))


# --------------------------------------------------------------------------- our export: the Hugging Face layout

def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "video", "of", "cat", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


# PandaConfig changes that give the nano decoder what sets each family apart
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": dict(qkv_bias=True, tie_embeddings=True),
            "llama3": dict(rope_theta=500000.0, rope_factor=8.0, rope_original_max_len=64)}  # all 3 rope branches


def panda_model(dtype=torch.float32, **changes):
    """A nano VideoPanda whose every tensor is distinct (norms near 1, everything else near 0, biases included) and
    whose BatchNorm statistics are away from their defaults, so that a tensor lost or misplaced cannot go unnoticed."""
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", **changes))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(("norm" in name) + 0.1 * torch.randn(p.shape, generator=g))
        norm = model.stab.lste.norm
        norm.running_mean.normal_(generator=g)
        norm.running_var.uniform_(0.5, 1.5, generator=g)
        norm.num_batches_tracked.fill_(42)
    model = model.to(dtype).eval()
    return model


def assert_same_model_weights(loaded, model):
    """Same config, same tensors bit for bit (dtypes included), same tying."""
    assert loaded.cfg == model.cfg and not loaded.training
    tied = loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    assert tied == model.cfg.tie_embeddings
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def assert_same_model(loaded, model):
    """assert_same_model_weights, and the same outputs on a nano video."""
    assert_same_model_weights(loaded, model)
    dtype = model.decoder.embed_tokens.weight.dtype
    video = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.tensor([[1, VIDEO_PLACEHOLDER, 7, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(video, ids), model(video, ids))


def load_quietly(path):
    """AutoModelForCausalLM.from_pretrained(path), failing on any warning it logs or raises and on any key it
    reports missing, unexpected or mismatched."""
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info
    assert [r.getMessage() for r in records] == [] and [str(w.message) for w in caught] == []
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "mistral"])
def test_hf_export_is_a_plain_llm_checkpoint_for_transformers(kind, tmp_path):
    model = panda_model(**FAMILIES[kind])
    save_pretrained(model, None, tmp_path, family="mistral" if kind == "mistral" else None)
    family = "llama" if kind == "llama3" else kind
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    hf = load_quietly(tmp_path)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "mistral": "MistralForCausalLM"}[family]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # a tied head is stored once, as the family does
        assert ("lm_head.weight" in f.keys()) == (kind != "qwen2")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, our_logits(model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind, dtype", [("qwen2", torch.float32), ("llama", torch.bfloat16)])
def test_hf_export_round_trips_bit_exactly(kind, dtype, tmp_path):
    model = panda_model(dtype, **FAMILIES[kind])
    save_pretrained(model, tiny_tokenizer(), tmp_path / "export")
    loaded, tokenizer = from_pretrained(tmp_path / "export", dtype=dtype)
    assert_same_model(loaded, model)
    assert tokenizer.encode("a video of a dog").ids == [1, 2, 3, 1, 5]
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert files == {"config.json", "model.safetensors", "panda_config.json", "panda_video.safetensors",
                     "tokenizer.json"}
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755  # readable by all, whatever the umask
    assert {(tmp_path / "export" / file).stat().st_mode & 0o777 for file in files} == {0o644}
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    assert config["dtype"] == config["torch_dtype"] == name and config["hidden_size"] == 32
    for file in ("model.safetensors", "panda_video.safetensors"):
        with safe_open(tmp_path / "export" / file, "pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("num_batches_tracked")}
            assert kinds == {"BF16" if dtype == torch.bfloat16 else "F32"}, file
    saved = json.loads((tmp_path / "export" / "panda_config.json").read_text())
    assert saved["n_frames"] == 4 and saved["stab_dim"] == 32  # what config.json does not say ...
    assert not {"d_model", "n_layers", "vocab_size", "qkv_bias", "tie_embeddings"} & saved.keys()  # ... and only that


def test_hf_export_shards_above_max_shard_size(tmp_path):
    model = panda_model()
    save_pretrained(model, None, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:
            keys = set(f.keys())
            sizes = [f.get_tensor(k).numel() * 4 for k in keys]
        assert keys == {k for k, s in index["weight_map"].items() if s == shard}
        assert sum(sizes) <= 20_000 or len(keys) == 1, shard  # over the limit only a tensor alone
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    hf = load_quietly(tmp_path)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, our_logits(model, ids), rtol=0, atol=1e-4)
    assert_same_model(from_pretrained(tmp_path)[0], model)


def test_hf_export_is_read_with_its_stab_after_transformers_saves_over_it(tmp_path):
    """The language model changed in transformers and saved in place (transformers 5 writes its own config.json,
    rope_parameters and all) comes back with the change, beside the STAB and projector that were there."""
    model = panda_model()
    save_pretrained(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight.add_(1.0)
    hf.save_pretrained(tmp_path)
    loaded, _ = from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    changed = "decoder.layers.1.mlp.up_proj.weight"
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name] + (name == changed)), name


def test_family_must_fit_the_decoder(tmp_path):
    with pytest.raises(ValueError, match="family='llama' does not fit a decoder with q/k/v biases"):
        save_pretrained(panda_model(qkv_bias=True), None, tmp_path / "a", family="llama")
    with pytest.raises(ValueError, match="family='qwen2' does not fit a decoder without q/k/v biases"):
        save_pretrained(panda_model(), None, tmp_path / "b", family="qwen2")
    with pytest.raises(ValueError, match="family must be one of llama, mistral, qwen2; got 'gpt2'"):
        save_pretrained(panda_model(), None, tmp_path / "c", family="gpt2")
    with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes.*got '5 GB please'"):
        save_pretrained(panda_model(), None, tmp_path / "d", max_shard_size="5 GB please")
    assert list(tmp_path.iterdir()) == []  # a refusal writes nothing


def test_export_refuses_to_overwrite_a_foreign_directory(tmp_path):
    model = panda_model()
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a panda export.*overwrite=True"):
        save_pretrained(model, None, target)
    assert (target / "notes.txt").read_text() == "mine"
    save_pretrained(model, None, target, overwrite=True)
    assert not (target / "notes.txt").exists()
    save_pretrained(model, None, target)  # one of our exports is replaced without asking
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_an_export_missing_a_file_or_with_a_foreign_field_says_so(tmp_path):
    save_pretrained(panda_model(), None, tmp_path / "export")
    video, config = tmp_path / "export" / "panda_video.safetensors", tmp_path / "export" / "panda_config.json"
    video.rename(tmp_path / "video")
    with pytest.raises(FileNotFoundError, match="has panda_config.json but no panda_video.safetensors"):
        from_pretrained(tmp_path / "export")
    (tmp_path / "video").rename(video)
    saved = json.loads(config.read_text())
    config.unlink()
    with pytest.raises(FileNotFoundError, match="has panda_video.safetensors but no panda_config.json"):
        from_pretrained(tmp_path / "export")
    config.write_text(json.dumps(saved | {"mystery": 1}))
    with pytest.raises(CheckpointError, match=r"panda_config.json: fields this PandaConfig does not know: \['myst"):
        from_pretrained(tmp_path / "export")


# --------------------------------------------------------------------------- our export: the release's layout

@pytest.fixture(scope="module")
def release_export(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("reexport") / "videopanda-mine"
    save_pretrained(official[1], tiny_tokenizer(), path, layout="release")
    return path


def test_release_export_has_the_release_keys_and_values(official, release_export):
    """Every key of the release's state dict under transformers 4.31 (which keeps each layer's rotary inv_freq)
    and no other; each tensor the one the release stored, bit for bit, except lmhra2, written idle."""
    state, model = official
    expected = {k: v for k, v in state.items() if not k.startswith(("model.video_tower_compressor.",
                                                                    "model.video_teacher."))}
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    written = {}
    for file in release_export.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            written |= {k: f.get_tensor(k) for k in f.keys()}
    assert written.keys() == expected.keys() | inv_freq
    for key, value in expected.items():
        if ".lmhra2." in key:
            idle = key.endswith(("pos_embed.0.weight", "pos_embed.0.running_var"))
            assert written[key].shape == value.shape and bool((written[key] == idle).all()), key
        else:  # the model holds the release's bf16 values in fp32, and its export keeps fp32
            assert written[key].dtype == (torch.int64 if value.dtype == torch.int64 else torch.float32), key
            assert torch.equal(written[key].to(value.dtype), value), key
    assert torch.equal(written["model.layers.1.self_attn.rotary_emb.inv_freq"], rope_inv_freq(model.cfg))
    config = json.loads((release_export / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == \
        ("videopanda", ["VideoPandaLlamaForCausalLM"], "float32")
    assert (config["video_hidden_size"], config["mm_hidden_size"], config["hidden_size"]) == (C, C, 64)
    assert "LB" in config["mm_video_tower"] and "mm_vision_tower" in config  # VideoTokenizer's check; the aliases
    assert config["requires_video_distill"] is False and config["mm_use_im_patch_token"] is False


def test_release_layout_round_trips_bit_exactly(official, release_export):
    """release -> panda -> release-layout export -> panda, read back through the release's strict key table."""
    loaded, tokenizer = from_pretrained(release_export)
    assert_same_model_weights(loaded, official[1])
    assert tokenizer.encode("a cat").ids == [1, 4]


def test_release_layout_refuses_what_the_release_cannot_build(tmp_path):
    with pytest.raises(ValueError, match=r"cannot build this model: image_size=32 \(the release has 448\).*"
                                         r"stab_dim=32 with stab_heads=2"):
        save_pretrained(panda_model(), None, tmp_path / "a", layout="release")
    with pytest.raises(ValueError, match=r"qkv_bias=True \(the release has False\)"):
        save_pretrained(panda_model(qkv_bias=True), None, tmp_path / "b", layout="release")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- checkpoints/export.py

def test_export_tool_converts_a_training_checkpoint(tmp_path, capsys):
    model = panda_model()
    run = tmp_path / "run"
    run.mkdir()
    run_files.save_checkpoint(run / "ckpt.pt", {"model": model.state_dict(), "model_config": asdict(model.cfg)})
    tiny_tokenizer().save(str(run / "tokenizer.json"))
    export_tool.main([f"--checkpoint={run}", f"--out={tmp_path / 'hf'}"])
    loaded, tokenizer = from_pretrained(tmp_path / "hf")
    assert_same_model(loaded, model)
    assert tokenizer.encode("a dog").ids == [1, 5] and str(tmp_path / "hf") in capsys.readouterr().out
    export_tool.main([f"--checkpoint={tmp_path / 'hf'}", "--dtype=bfloat16", f"--out={tmp_path / 'bf16'}"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(SystemExit, match=r"^error: the release's code cannot build this model: image_size=32"):
        cli.run(export_tool.main, [f"--checkpoint={run / 'ckpt.pt'}", "--layout=release", f"--out={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists()


def test_export_tool_converts_the_release_into_the_hf_layout(official_dir, official, tmp_path):
    export_tool.main([f"--checkpoint={official_dir[1]}", f"--out={tmp_path}", "--max_shard_size=100KB"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["dtype"]) == ("llama", "bfloat16")  # the release's dtype, kept
    loaded, _ = from_pretrained(tmp_path)
    assert_same_model_weights(loaded, official[1])


def test_export_tool_answers_help_and_refuses_a_plain_llm(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        export_tool.main(["--help"])
    assert done.value.code == 0 and "--layout=hf" in capsys.readouterr().out
    save_hf(hf_model("llama"), tmp_path, "safetensors")
    with pytest.raises(ValueError, match="language model only"):
        export_tool.main([f"--checkpoint={tmp_path}", f"--out={tmp_path / 'out'}"])


# --------------------------------------------------------------------------- errors that say what was looked for

def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama, mistral, qwen2, videopanda$"):
        from_pretrained(tmp_path)


def test_missing_config_or_weights_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_LLM, model_type="llama")))
    with pytest.raises(FileNotFoundError, match="model.safetensors, model.safetensors.index.json, pytorch_model.bin"):
        from_pretrained(tmp_path, preset="nano")
