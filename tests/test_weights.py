"""Tests of weights.py: Hugging Face Llama-family checkpoints, the release's layout (spec F.2), our own exports.
transformers is a test-only dependency: it writes the reference checkpoints and computes the reference outputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from panda import VIDEO_PLACEHOLDER, KVCache, PandaConfig, VideoPanda, rope_inv_freq
from weights import CheckpointError, config_from_hf, from_pretrained, save_pretrained

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


def write_bin(state, path, shards):
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys, weight_map = list(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        torch.save({k: state[k] for k in part}, path / name)
        weight_map |= {k: name for k in part}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


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
        seen = (slots <= L + step).view(1, 1, 1, -1)  # the prompt and the new tokens so far
        h = decoder(decoder.embed_tokens(out[-1][:, None]), slots[None, L + step:L + step + 1], mask=seen,
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


# --------------------------------------------------------------------------- the release's layout (spec F.2)

C, R = 1024, 682  # STAB width as released; LSTE bottleneck int(1024 // 1.5)


def official_stab_shapes():
    """model.video_tower.* keys and shapes of the release, written out from spec F.2."""
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
def official(tmp_path_factory):
    state = official_state()
    model, _ = from_pretrained(write_official(state, tmp_path_factory.mktemp("release") / "fitu"))
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


# official key under model.video_tower. -> ours under stab., restated from spec F.2 independently of weights.py
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


# --------------------------------------------------------------------------- our export

def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "video", "of", "cat", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("tied, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_export_round_trips_bit_exactly(tied, dtype, tmp_path):
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", tie_embeddings=tied)).to(dtype).eval()
    with torch.no_grad():  # BatchNorm buffers away from their defaults, so that losing them would show
        model.stab.lste.norm.running_mean.normal_()
        model.stab.lste.norm.num_batches_tracked.fill_(42)
    save_pretrained(model, tiny_tokenizer(), tmp_path / "export")
    loaded, tokenizer = from_pretrained(tmp_path / "export", dtype=dtype)
    assert loaded.cfg == model.cfg
    assert (loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight) == tied
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    video = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.tensor([[1, VIDEO_PLACEHOLDER, 7, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(video, ids), model(video, ids))
    assert tokenizer.encode("a video of a dog").ids == [1, 2, 3, 1, 5]
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf["model_type"] == "panda" and hf["hidden_size"] == 32 and hf["panda_config"]["n_frames"] == 4


def test_export_refuses_to_overwrite_a_foreign_directory(tmp_path):
    model = VideoPanda(PandaConfig.preset("nano"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a panda export.*overwrite=True"):
        save_pretrained(model, None, target)
    assert (target / "notes.txt").read_text() == "mine"
    save_pretrained(model, None, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    save_pretrained(model, None, target)  # a previous panda export may be replaced without asking
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


# --------------------------------------------------------------------------- errors that say what was looked for

def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama, mistral, qwen2, videopanda, panda"):
        from_pretrained(tmp_path)


def test_missing_config_or_weights_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_LLM, model_type="llama")))
    with pytest.raises(FileNotFoundError, match="model.safetensors, model.safetensors.index.json, pytorch_model.bin"):
        from_pretrained(tmp_path, preset="nano")
