"""Tests of distillation (Sec. 3.2, the release's VideoCompressor): the loss, the head, where the grid tokens sit in the spliced
sequence, gradients into the STAB, the oracle teacher against the pixels, and train.py --distill."""

import numpy as np
import pytest
import torch

from checkpoints import run_files
import data
from distillation import teachers
import train
from distillation.teachers import DistillHead, cosine_loss, distill_loss, grid_positions
from panda import VIDEO_PLACEHOLDER, PandaConfig, VideoPanda, rope_inv_freq
from real_video import letterbox_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return data.build_tokenizer()


def nano(tokenizer=None, **overrides):
    torch.manual_seed(0)
    vocab = dict(vocab_size=tokenizer.get_vocab_size()) if tokenizer else {}
    return VideoPanda(PandaConfig.preset("nano", **vocab, **overrides))


# --------------------------------------------------------------------------- the loss and the head

def test_loss_is_0_for_identical_features_and_2_for_opposite_ones():
    x = torch.randn(2, 4, 3, 3, 16)
    assert abs(cosine_loss(x, x).item()) < 1e-6
    assert abs(cosine_loss(-x, x).item() - 2) < 1e-6
    assert abs(cosine_loss(x, torch.zeros_like(x)).item() - 1) < 1e-6  # a zero teacher: cosine 0
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[:, :2] = True
    y = x.clone()
    y[:, :, 2] = -y[:, :, 2]  # only the masked-out row differs
    assert abs(cosine_loss(y, x, valid).item()) < 1e-6


def test_loss_averages_frames_not_cells():
    """As the release: a frame with fewer valid cells weighs as much as one with more."""
    target = torch.randn(2, 1, 2, 2, 8)
    pred = target.clone()
    pred[0, 0, 0, 0] = -pred[0, 0, 0, 0]  # video 0 has one valid cell, and it is opposite: loss 2
    valid = torch.tensor([[[True, False], [False, False]], [[True, True], [True, True]]])
    assert abs(cosine_loss(pred, target, valid).item() - 1.0) < 1e-6  # (2 + 0) / 2 frames


def test_head_taps_and_attention_over_layers():
    assert DistillHead(PandaConfig.preset("paper", d_model=8, n_layers=32), 16).taps == [32, 28, 24, 20, 16,
                                                                                        12, 8, 4, 0]
    cfg = PandaConfig.preset("nano", n_layers=6)
    torch.manual_seed(0)
    head = DistillHead(cfg, 16)
    assert head.taps == [6, 2, 0]
    hidden = [torch.randn(5, cfg.d_model) for _ in range(cfg.n_layers + 1)]
    s = torch.stack([head.norm_layer[j](hidden[i]) for j, i in enumerate(head.taps)], 1)  # (5, 3, 16)
    q, kv = s[:, :1].view(5, 1, 8, 2), s[:, 1:].view(5, 2, 8, 2)  # 8 heads of 2
    weights = (torch.einsum("nqhd,nkhd->nhk", q, kv) * 16 ** -0.5).softmax(-1)  # the full width's scale
    o = torch.einsum("nhk,nkhd->nhd", weights, kv).reshape(5, 16)
    expected = head.input_layer(hidden[6]) + head.output_layer(o)
    torch.testing.assert_close(head(hidden), expected)
    with pytest.raises(ValueError, match="multiple of"):
        DistillHead(cfg, 15)


# --------------------------------------------------------------------------- grid positions

def positions_by_walking(cfg, start, valid):
    """The layout walked token by token: per frame a fused token, then each valid row's cells and its split."""
    B, g = valid.shape[:2]
    out = torch.full((B, cfg.n_frames, g, g), -1)
    for b in range(B):
        at = int(start[b])
        for t in range(cfg.n_frames):
            at += 1  # the fused token
            for r in range(g):
                if not valid[b, r].any():
                    continue
                for c in range(g):
                    if valid[b, r, c]:
                        out[b, t, r, c] = at
                        at += 1
                at += cfg.split_tokens
    return out


@pytest.mark.parametrize("split_tokens", [True, False])
def test_grid_positions_follow_the_token_layout(split_tokens):
    cfg = PandaConfig.preset("paper", split_tokens=split_tokens, image_size=224, n_frames=4, chunk_frames=2)  # 8x8
    valid = torch.zeros(3, 8, 8, dtype=torch.bool)
    valid[0] = True
    valid[1, 2:6] = True   # a landscape box
    valid[2, :, 1:4] = True  # a portrait box
    start = torch.tensor([5, 0, 11])
    expected = positions_by_walking(cfg, start, valid)
    assert torch.equal(grid_positions(cfg, start, valid), expected)
    assert torch.equal(grid_positions(cfg, start[:1]), expected[:1])  # valid=None: every cell


@pytest.mark.parametrize("split_tokens", [True, False])
def test_grid_positions_pick_the_lsd_tokens_out_of_the_spliced_sequence(split_tokens):
    """End to end: the decoder's input at those positions is the projected LSD output of that cell,
    also for a letterboxed video beside a full one."""
    model = nano(split_tokens=split_tokens).eval()
    cfg = model.cfg
    v = torch.randn(2, cfg.n_frames, 4, 32, 32)
    v[:, :, 3] = 1
    v[0, :, 3, 16:] = 0  # video 0: only the top row of the 2 x 2 grid is real
    ids = torch.tensor([[1, 2, VIDEO_PLACEHOLDER, 3, 4], [1, VIDEO_PLACEHOLDER, 3, 4, 5]])
    grids = []
    handle = model.stab.lsd.register_forward_hook(lambda module, args, out: grids.append(out))
    x, _, _ = model.embed_inputs(v, ids)
    handle.remove()
    projected = model.projector(grids[0]).view(2, cfg.n_frames, 2, 2, -1)  # (B, T, g, g, d)
    valid = letterbox_tokens.valid_cells(v, 2)
    pos = grid_positions(cfg, torch.tensor([2, 1]), valid)
    for b, t, r, c in zip(*torch.nonzero(pos >= 0, as_tuple=True)):
        torch.testing.assert_close(x[b, pos[b, t, r, c]], projected[b, t, r, c])
    assert (pos[0, :, 1] == -1).all() and (pos[1] >= 0).all()


# --------------------------------------------------------------------------- gradients

def test_distillation_gradient_reaches_the_stab(tokenizer):
    model = nano(tokenizer, n_layers=6).train()  # taps [6, 2, 0]: the last one attends over two (one would be trivial)
    with torch.no_grad():  # wake the zero-initialised outputs (GSTRA, LSTE) so that gradient flows through them
        for p in model.stab.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batch = data.SyntheticQA(tokenizer, "train", model.cfg.n_frames, model.cfg.image_size).batch(0, 2)
    teacher, dim = teachers.make_teacher("oracle", model.cfg)
    head = DistillHead(model.cfg, dim)
    _, hidden = model(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"], return_hidden=True)
    loss = distill_loss(head, teacher, batch, hidden, model)
    assert 0 < loss.item() < 2
    loss.backward()
    for name, p in [*model.stab.named_parameters(), *model.projector.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer = train.make_optimizer(model, train.TrainConfig(), True, head)
    assert {id(p) for p in head.parameters()} <= {id(p) for p in optimizer.param_groups[0]["params"]}


def test_decoder_hidden_states_follow_hugging_faces_count():
    model = nano().eval()
    x = torch.randn(2, 6, model.cfg.d_model)
    pos = torch.arange(6)[None]
    out, hidden = model.decoder(x, pos, return_hidden=True)
    assert len(hidden) == model.cfg.n_layers + 1 and hidden[0] is x
    assert torch.equal(hidden[-1], out) and torch.equal(out, model.decoder(x, pos))
    assert torch.equal(hidden[1], model.decoder.layers[0](x, *rotary(model, pos)))


def rotary(model, positions):
    angles = positions[..., None].float() * rope_inv_freq(model.cfg)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------- the oracle teacher

@pytest.mark.parametrize("split,n_frames,size,grid", [("train", 8, 48, 3), ("heldout", 8, 48, 3), ("train", 4, 32, 2),
                                                      ("train", 8, 64, 4)])
def test_oracle_features_agree_with_the_pixels(split, n_frames, size, grid):
    names, colors = teachers.ORACLE_FEATURES, np.array(list(data.COLORS.values()))  # (5, 3)
    cell = size // grid
    for i in range(40):
        s = data.make_sample(i, split, n_frames, size)
        f = teachers.oracle_features(s, grid)
        assert f.shape == (n_frames, grid, grid, 24) and f.dtype == np.float32
        rows, cols = f[..., names.index("row 0"):names.index("row 3") + 1], f[..., names.index("column 0"):]
        assert (rows.sum(-1) == 1).all() and (cols.sum(-1) == 1).all()  # every cell says where it is
        assert (rows.argmax(-1) == np.arange(grid)[:, None]).all() and (cols.argmax(-1) == np.arange(grid)).all()
        f = f[..., :names.index("row 0")]  # what the cell shows
        cells = s.video.reshape(n_frames, grid, cell, grid, cell, 3).transpose(0, 1, 3, 2, 4, 5)
        cells = cells.reshape(n_frames, grid, grid, cell * cell, 1, 3)
        counts = (cells == colors).all(-1).sum(-2)  # (T, g, g, 5): pixels of each colour per cell
        empty = counts.sum(-1) == 0
        assert (f[empty] == 0).all() and (f[~empty, names.index("visible")] == 1).all()
        top = np.sort(counts, -1)
        clear = ~empty & (top[..., -1] > top[..., -2])  # one colour covers most of the cell
        said = f[..., names.index("red"):names.index("white") + 1].argmax(-1)  # the oracle's colour
        assert (said[clear] == counts.argmax(-1)[clear]).all()
        coverage = counts.max(-1) / cell ** 2
        np.testing.assert_allclose(f[clear][:, names.index("coverage")], coverage[clear])
        for t, r, c in zip(*np.nonzero(~empty)):  # shape and motion are those of the object of that colour
            color = list(data.COLORS)[said[t, r, c]]
            obj = next(o for o in s.objects if o.visible[t] and o.colors[t] == color)
            assert f[t, r, c, names.index(obj.shape)] == 1 and f[t, r, c, names.index(obj.direction or "still")] == 1
            assert f[t, r, c, :names.index("visible")].sum() == 3  # one shape, one colour, one motion


def test_oracle_needs_whole_cells():
    with pytest.raises(ValueError, match="whole cells"):
        teachers.oracle_features(data.make_sample(0), 5)


# --------------------------------------------------------------------------- train.py --distill=oracle

NANO_RUN = ["--preset=nano", "--device=cpu", "--batch_size=2", "--warmup_steps=1", "--eval_every=1000",
            "--save_every=1000", "--eval_samples=1", "--questions_per_clip=1"]


def test_train_with_the_oracle_teacher_saves_and_resumes_its_head(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "evaluate", lambda *args, **kwargs: {"all": 0.0})  # answering is not tested here
    args = NANO_RUN + [f"--out_dir={tmp_path}"]
    train.main(args + ["--max_steps=1", "--distill=oracle", "--distill_weight=0.5"])
    ckpt = run_files.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["train_config"]["distill"] == "oracle" and "norm_layer.0.1.weight" in ckpt["distill_head"]
    train.main(args + ["--max_steps=2", "--init_from=resume"])
    assert run_files.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    with pytest.raises(ValueError, match=r"options it began with; these differ: --distill= \(oracle there\)"):
        train.main(args + ["--max_steps=3", "--init_from=resume", "--distill="])
    with pytest.raises(ValueError, match="--distill must be"):
        train.main(args[:-1] + [f"--out_dir={tmp_path / 'other'}", "--distill=clip"])


def test_distillation_is_on_by_default_on_the_synthetic_task(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "evaluate", lambda *args, **kwargs: {"all": 0.0})
    args = NANO_RUN + ["--max_steps=1"]
    train.main(args + [f"--out_dir={tmp_path / 'auto'}"])  # --distill=auto: the synthetic task has the oracle
    ckpt = run_files.load_checkpoint(tmp_path / "auto" / "ckpt.pt")
    assert ckpt["train_config"]["distill"] == "oracle" and ckpt["distill_head"] is not None
    train.main(args + [f"--out_dir={tmp_path / 'off'}", "--distill="])
    ckpt = run_files.load_checkpoint(tmp_path / "off" / "ckpt.pt")
    assert ckpt["train_config"]["distill"] == "" and ckpt["distill_head"] is None
