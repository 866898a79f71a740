"""Tests of the ViT teacher (teachers.ViT, ViTTeacher, vit_teacher), of how its patches pair with the
student's LSD cells on letterboxed clips, of loading the release's distillation head, and a smoke run
of distillation/teacher_bench.py. transformers is the reference: it writes the checkpoints and computes the
features the teacher must reproduce."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tools import cli

from checkpoints import run_files
from checkpoint_files import write_bin
from distillation import teachers
from real_video import letterbox_tokens, video_files
from distillation.teachers import DistillHead, ViT, ViTConfig, distill_loss, valid_patches
from panda import VIDEO_PLACEHOLDER, PandaConfig, VideoPanda

transformers = pytest.importorskip("transformers")

NANO = PandaConfig.preset("nano")  # 32-px frames, 8-px patches, 2x2 LSD windows: a 2x2 grid
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
            image_size=16)  # 16-px frames in 8-px patches: the same 2x2 grid


def hf_vision(act="quick_gelu", **changes):
    """A tiny random CLIPVisionModel whose every tensor is distinct and whose LayerNorms are not the
    identity, so that a tensor put in the wrong place or skipped cannot go unnoticed."""
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**(TINY | changes), hidden_act=act))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(("norm" in name) + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(hf, path, layout):
    """The checkpoint layouts a teacher comes in. transformers 5 writes CLIPVisionModel's keys bare;
    before it, and in any CLIPModel (OpenAI's CLIP, LanguageBind), they sit under vision_model."""
    if layout == "vision, safetensors":
        hf.save_pretrained(path)
    elif layout == "vision, sharded bin":  # transformers 4: prefixed, with the position_ids buffer
        hf.config.save_pretrained(path)
        state = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
        state["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
        write_bin(state, path, shards=2)
    else:  # "clip": a whole CLIPModel, text tower and projections included
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=hf.config.to_dict(),
                                                              projection_dim=8))
        clip.vision_model.load_state_dict(hf.state_dict())
        clip.save_pretrained(path)
    return path


def hf_features(hf, frames):
    """hidden_states[-2] without the class token, as the release reads its teacher: (B, T, g, g, D)."""
    B, T, _, S, _ = frames.shape
    with torch.no_grad():
        hidden = hf(pixel_values=frames[:, :, :3].flatten(0, 1), output_hidden_states=True).hidden_states
    g = S // hf.config.patch_size
    return hidden[-2][:, 1:].reshape(B, T, g, g, -1)


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def batch_of(teacher_videos, student_size=32):
    """A batch as the datasets make it: the student's frames beside the teacher's (the mask alike)."""
    B, T = teacher_videos.shape[:2]
    videos = torch.zeros(B, T, 4, student_size, student_size)
    videos[:, :, 3] = 1
    return {"videos": videos, "teacher_videos": teacher_videos}


def random_frames(B=2, T=4, size=16):
    frames = torch.randn(B, T, 4, size, size, generator=torch.Generator().manual_seed(2))
    frames[:, :, 3] = 1
    return frames


# --------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("layout", ["vision, safetensors", "vision, sharded bin", "clip"])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_teacher_features_are_hugging_faces_hidden_states_minus_2(layout, act, tmp_path):
    """fp32 on both sides, the same operations in another order: rounding differences of ~1e-6
    relative, far below 1e-4; a wrong layer, activation, norm or patch order is off by far more."""
    hf = hf_vision(act)
    teacher, dim = teachers.make_teacher("vit", NANO, path=save(hf, tmp_path, layout))
    frames = random_frames()
    features = teacher(batch_of(frames))
    assert dim == 32 and features.shape == (2, 4, 2, 2, 32) and features.dtype == torch.float32
    assert relative_error(features, hf_features(hf, frames)) <= 1e-4
    with torch.no_grad():  # all layers: last_hidden_state (post_layernorm acts on the pooled token only)
        expected = hf(pixel_values=frames[:, :, :3].flatten(0, 1)).last_hidden_state
        assert relative_error(teacher.vit(frames[:, :, :3].flatten(0, 1)), expected) <= 1e-4


def test_teacher_is_frozen_outside_autograd_and_autocast(tmp_path):
    teacher, _ = teachers.make_teacher("vit", NANO, path=save(hf_vision(), tmp_path, "vision, safetensors"))
    assert not isinstance(teacher, torch.nn.Module)  # so no model, head, optimizer or wrapper can take it in
    assert not teacher.vit.training and not any(p.requires_grad for p in teacher.vit.parameters())
    assert teachers.teacher_dtype("cuda") == torch.bfloat16 and teachers.teacher_dtype("cpu") == torch.float32
    batch = batch_of(random_frames())
    features = teacher(batch)
    assert not features.requires_grad
    with torch.autocast("cpu", torch.bfloat16):  # the training step's autocast does not reach the teacher
        assert torch.equal(teacher(batch), features)


def test_a_random_vit_l14_is_clip_l14_less_its_post_layernorm():
    """The constructor alone (no checkpoint) builds ViT-L/14 at any size, with CLIPVisionModel's tensors."""
    config = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, patch_size=14, image_size=336)
    with torch.device("meta"):
        ours, theirs = ViT(ViTConfig(image=336)).state_dict(), transformers.CLIPVisionModel(config).state_dict()
    expected = {k.removeprefix("embeddings.").removeprefix("encoder."): v.shape for k, v in theirs.items()
                if not k.startswith("post_layernorm.")}
    assert {k: v.shape for k, v in ours.items()} == expected
    assert ours["position_embedding.weight"].shape == (24 * 24 + 1, 1024)


# --------------------------------------------------------------------------- letterboxed clips

@pytest.mark.parametrize("height, width", [(90, 160), (160, 90), (120, 120), (40, 400), (1080, 1920), (700, 500)])
def test_student_valid_cells_are_the_teachers_valid_patches(height, width):
    """The release's geometry: the same decoded frames, letterboxed at 448 px in 28-px blocks for the
    student and at 224 px in 14-px patches for the teacher. The teacher's valid box is exactly half the
    student's, so the teacher keeps (avg_pool(mask, 14) == 1) the patches of the student's valid cells."""
    frames = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    student, teacher = video_files.letterbox(frames, 448, 14, 2)[None], video_files.letterbox(frames, 224, 14, 1)[None]
    assert torch.equal(student[:, :, 3, ::2, ::2], teacher[:, :, 3])  # the box, pixel for pixel
    cells = letterbox_tokens.valid_cells(student, 16)  # the paper's 16 x 16 grid; None: every cell
    cells = torch.ones(1, 16, 16, dtype=torch.bool) if cells is None else cells
    patches = valid_patches(teacher, 14)
    assert torch.equal(cells, patches)
    rows, columns = int(patches.any(2).sum()), int(patches.any(1).sum())
    assert (rows < 16) == (width > height) and (columns < 16) == (height > width)  # the padded side
    teachers.check_pairing(student, teacher, PandaConfig.preset("paper"), 14)


def test_a_patch_counts_only_when_wholly_inside_the_box_in_every_frame():
    video = torch.ones(1, 2, 4, 28, 28)
    video[:, :, 3, :, 21:] = 0  # the box ends half-way through the second column of 14-px patches
    assert valid_patches(video, 14).tolist() == [[[True, False], [True, False]]]
    video[:, 1, 3, 0, 0] = 0  # one pixel less, in the second frame only
    assert valid_patches(video, 14).tolist() == [[[False, False], [True, False]]]
    assert valid_patches(video[:, :, :3], 14).all()  # no mask channel: every patch


def test_a_clip_flipped_without_its_teacher_frames_is_refused():
    """A portrait clip 9 blocks wide pads 3 blocks left and 4 right: flipping moves its box by one cell.
    (The release flips the student and teacher frames independently.)"""
    frames = np.zeros((1, 160, 90, 3), dtype=np.uint8)
    student, teacher = video_files.letterbox(frames, 448, 14, 2)[None], video_files.letterbox(frames, 224, 14, 1)[None]
    cfg = PandaConfig.preset("paper")
    teachers.check_pairing(student.flip(-1), teacher.flip(-1), cfg, 14)  # flipped together: fine
    with pytest.raises(ValueError, match=r"video 0 of the batch: the teacher's letterbox \(rows 0-15, columns 3-11\) "
                                         r"is not the student's \(rows 0-15, columns 4-12\).*flipped together"):
        teachers.check_pairing(student.flip(-1), teacher, cfg, 14)


def test_distillation_with_the_vit_teacher_on_a_letterboxed_clip(tmp_path):
    """End to end on the nano model: a landscape clip whose bottom row is padding beside a square one.
    The loss ignores the teacher's features outside the box, and its gradient reaches the STAB."""
    teacher, dim = teachers.make_teacher("vit", NANO, path=save(hf_vision(), tmp_path, "vision, safetensors"))
    torch.manual_seed(0)
    model = VideoPanda(NANO).train()
    with torch.no_grad():  # wake the zero-initialised outputs (GSTRA, LSTE) so that gradient flows through them
        for p in model.stab.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    head = DistillHead(NANO, dim)
    batch = batch_of(random_frames())
    batch["videos"] = torch.randn(2, 4, 4, 32, 32)
    batch["videos"][:, :, 3] = 1
    batch["videos"][0, :, 3, 16:] = 0  # student: the bottom 16-px row of cells is padding
    batch["teacher_videos"][0, :, 3, 8:] = 0  # teacher: the bottom 8-px row of patches
    batch["input_ids"] = torch.tensor([[1, 2, VIDEO_PLACEHOLDER, 3, 4], [1, VIDEO_PLACEHOLDER, 3, 4, 5]])
    _, hidden = model(batch["videos"], batch["input_ids"], return_hidden=True)
    loss = distill_loss(head, teacher, batch, hidden, model)
    assert 0 < loss.item() < 2
    outside = torch.zeros(2, 4, 2, 2, dim)
    outside[0, :, 1] = 100.0  # anything at the padded cells
    assert torch.equal(distill_loss(head, lambda b: teacher(b) + outside, batch, hidden, model), loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stab.patch_embed.parameters())


# --------------------------------------------------------------------------- bad checkpoints and inputs

def test_languagebinds_video_tower_is_refused(tmp_path):
    state = {f"vision_model.{k}": v for k, v in hf_vision().state_dict().items()}
    state["vision_model.encoder.layers.0.temporal_embedding"] = torch.zeros(1, 8, 32)  # its per-layer additions
    state["vision_model.encoder.layers.0.temporal_attn.q_proj.weight"] = torch.zeros(32, 32)
    hf_vision().config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(run_files.CheckpointError, match=r"model.safetensors: 'vision_model.encoder.layers.0.temporal_.*"
                                                     r"temporal attention across frames.*an image tower"):
        teachers.make_teacher("vit", NANO, path=tmp_path)


@pytest.mark.parametrize("change, message", [
    ("drop encoder.layers.2.mlp.fc1.bias", r"1 tensor\(s\) of a CLIP vision tower are not in the checkpoint, "
                                           r"e.g. \['layers.2.mlp.fc1.bias'\]"),
    ("add encoder.layers.3.mlp.fc1.bias", r"model.safetensors: unexpected key 'encoder.layers.3.mlp.fc1.bias'"),
    ("reshape encoder.layers.0.self_attn.k_proj.weight",
     r"'encoder.layers.0.self_attn.k_proj.weight' has shape \(32, 31\), a CLIP vision tower expects \(32, 32\)"),
    ("add vision_model.embeddings.class_embedding", r"duplicate key 'vision_model.embeddings.class_embedding'"),
])
def test_bad_checkpoints_name_the_file_and_the_key(change, message, tmp_path):
    hf = hf_vision()
    state = dict(hf.state_dict())
    verb, key = change.split()
    if verb == "drop":
        del state[key]
    elif verb == "add":
        state[key] = state[key.removeprefix("vision_model.").replace("layers.3", "layers.2")].clone()
    else:
        state[key] = torch.zeros(32, 31)
    hf.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(run_files.CheckpointError, match=message):
        teachers.make_teacher("vit", NANO, path=tmp_path)


def test_bad_teacher_setups_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="--distill=vit needs --teacher=DIR"):
        teachers.make_teacher("vit", NANO)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        teachers.make_teacher("vit", NANO, path=tmp_path)
    path = save(hf_vision(), tmp_path / "tiny", "vision, safetensors")
    with pytest.raises(ValueError, match=r"16-px frames in 8-px patches make a 2x2 grid, the student's LSD grid "
                                         r"is 3x3"):
        teachers.make_teacher("vit", PandaConfig.preset("tiny"), path=path)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"vision_config": dict(TINY, image_size=20)}))
    with pytest.raises(run_files.CheckpointError, match=r"odd/config.json: not a CLIP vision config: .*image 20, patch 8"):
        teachers.make_teacher("vit", NANO, path=tmp_path / "odd")
    teacher, _ = teachers.make_teacher("vit", NANO, path=path)
    with pytest.raises(ValueError, match=r"batch\['teacher_videos'\], \(B, T, 4, 16, 16\) from a dataset made with "
                                         r"teacher_size=16; found none"):
        teacher({"videos": torch.zeros(1, 4, 3, 32, 32)})
    with pytest.raises(SystemExit, match=r"^error: .*odd/config.json: not a CLIP vision config"):  # one line
        cli.run(lambda argv: teachers.make_teacher("vit", NANO, path=tmp_path / "odd"), [])


# --------------------------------------------------------------------------- the release's head

def release_head_state(cfg, dim):
    """model.video_tower_compressor.* as the release stores it (bf16), beside its teacher alias and
    some of the rest of a release checkpoint."""
    g = torch.Generator().manual_seed(0)
    names = DistillHead(cfg, dim).state_dict()
    state = {f"model.video_tower_compressor.{k}": torch.randn(v.shape, generator=g).bfloat16()
             for k, v in names.items()}
    state["model.video_tower_compressor.teacher_layer.video_tower.embeddings.class_embedding"] = torch.zeros(dim)
    state["model.video_teacher.video_tower.embeddings.class_embedding"] = torch.zeros(dim)
    state["model.video_tower.balance"] = torch.zeros(8)
    state["model.embed_tokens.weight"] = torch.zeros(4, cfg.d_model)
    return state


RELEASE_CFG = PandaConfig.preset("nano", n_layers=32)  # the release's 32 layers: taps 32, 28, ..., 0


def test_release_head_loads_into_distill_head(tmp_path):
    state = release_head_state(RELEASE_CFG, 16)
    assert len([k for k in state if k.startswith("model.video_tower_compressor.norm_layer.8.1")]) == 1  # 9 taps
    path = write_bin(state, tmp_path / "release", shards=2)
    head = DistillHead(RELEASE_CFG, 16)
    teachers.load_release_head(head, path)
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, state[f"model.video_tower_compressor.{name}"].float()), name
    # a head for a decoder of other depth has other taps
    with pytest.raises(run_files.CheckpointError, match=r"unexpected key 'model.video_tower_compressor.norm_layer.8"):
        teachers.load_release_head(DistillHead(PandaConfig.preset("nano", n_layers=28), 16), path)
    with pytest.raises(run_files.CheckpointError, match=r"release: 3 tensor\(s\) of the distillation head are not in "
                                                     r"the checkpoint, e.g. \['norm_layer.9.0.weight'"):
        teachers.load_release_head(DistillHead(PandaConfig.preset("nano", n_layers=36), 16), path)


@pytest.mark.parametrize("change, message", [
    ("drop model.video_tower_compressor.output_layer.bias", r"e.g. \['output_layer.bias'\]"),
    ("add model.video_tower_compressor.mystery", r"unexpected key 'model.video_tower_compressor.mystery'"),
    ("reshape model.video_tower_compressor.input_layer.weight",
     r"'model.video_tower_compressor.input_layer.weight' has shape \(3, 3\), the distillation head expects \(16, 32\)"),
])
def test_release_head_errors_name_the_key(change, message, tmp_path):
    state = release_head_state(RELEASE_CFG, 16)
    verb, key = change.split()
    if verb == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(3, 3)
    with pytest.raises(run_files.CheckpointError, match=message):
        teachers.load_release_head(DistillHead(RELEASE_CFG, 16), write_bin(state, tmp_path / "release", shards=1))


# --------------------------------------------------------------------------- distillation/teacher_bench.py

def test_teacher_bench_smoke_run(tmp_path):
    from distillation import teacher_bench
    out = tmp_path / "teacher.json"
    teacher_bench.main(["--device=cpu", "--preset=nano", "--vit=tiny", "--batch=2", "--warmup=0", "--steps=1",
                        f"--json={out}"])
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["off", "head", "teacher", "teacher alone"]
    assert all(r["ms"] > 0 for r in results)
