"""Tests of panda.py: token counts, parameter counts, initialisation, masks, the KV cache, gradients."""

import pytest
import torch

from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER, PandaConfig, VideoPanda
from real_video.letterbox_tokens import pack_left


def nano(**overrides):
    torch.manual_seed(0)
    return VideoPanda(PandaConfig.preset("nano", **overrides)).eval()


def paper_geometry(**overrides):
    """The paper's frames (8 x 448px, patch 14, LSD 2, chunks of 4) with narrow widths, fast on a CPU."""
    torch.manual_seed(0)
    cfg = PandaConfig.preset("paper", stab_dim=16, stab_heads=2, d_model=16, n_layers=1, n_heads=2,
                             n_kv_heads=2, ffn_dim=32, vocab_size=50, **overrides)
    return VideoPanda(cfg).eval()


def videos(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.n_frames, 3, cfg.image_size, cfg.image_size, generator=g)


def prompts(lengths, vocab, placeholder_at=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=g)
    ids[:, placeholder_at] = VIDEO_PLACEHOLDER
    for i, n in enumerate(lengths):
        ids[i, n:] = 0  # padding: whatever value, it must never matter
    return ids, torch.tensor(lengths)


def letterbox_mask(S, valid_h, valid_w):
    """A centred valid box of valid_h x valid_w pixels on an S x S canvas, as (S, S)."""
    mask = torch.zeros(S, S)
    top, left = (S - valid_h) // 2 // 28 * 28, (S - valid_w) // 2 // 28 * 28
    mask[top:top + valid_h, left:left + valid_w] = 1
    return mask


# --------------------------------------------------------------------------- sizes and counts

def test_paper_preset_parameter_count_is_the_papers_45M():
    with torch.device("meta"):
        model = VideoPanda(PandaConfig.preset("paper"))
    n = model.num_params()
    assert n["stab"] + n["projector"] == 45_066_578
    assert n["stab"] == 24_086_866 and n["projector"] == 20_979_712
    assert n["decoder"] == 6_738_415_616  # Llama-2-7B / Vicuna-7B


def test_paper_preset_gives_273_tokens_per_frame_and_2184_per_video():
    with torch.device("meta"):
        model = VideoPanda(PandaConfig.preset("paper"))
        vis, lengths = model.encode_videos(torch.empty(2, 8, 3, 448, 448))
    assert vis.shape == (2, 2184, 4096) and lengths.shape == (2,)
    assert 2184 == 8 * 273


@pytest.mark.parametrize("valid_h, valid_w, per_frame", [
    (448, 448, 273),        # square: 16 x (16 + 1) + 1
    (252, 448, 154),        # 16:9 landscape: 9 rows of 16 cells
    (336, 448, 205),        # 4:3 landscape: 12 rows
    (448, 280, 1 + 16 * 11),  # portrait: 16 rows of 10 cells
])
def test_letterboxed_token_counts_match_the_spec(valid_h, valid_w, per_frame):
    model = paper_geometry()
    square = torch.ones(448, 448)
    boxed = letterbox_mask(448, valid_h, valid_w)
    v = torch.randn(2, 8, 4, 448, 448)
    v[0, :, 3], v[1, :, 3] = boxed, square  # two videos of different shapes in one batch
    tokens, lengths = model.stab(v)
    assert lengths.tolist() == [8 * per_frame, 8 * 273]
    assert tokens.shape[1] == 8 * 273
    assert (tokens[0, 8 * per_frame:] == 0).all()  # packing pads the shorter video with zeros


def test_letterboxed_tokens_equal_a_per_frame_crop_reference():
    """The release crops each frame to its valid box and loops over frames; our batched masking
    must give exactly the same tokens."""
    model = paper_geometry()
    stab = model.stab
    v = torch.randn(1, 8, 4, 448, 448)
    v[0, :, 3] = letterbox_mask(448, 336, 448)
    tokens, n = stab(v)

    # reference: everything up to LSD is per pixel or per chunk, so reuse it; then crop and loop
    p = stab.patch_embed(v[0, :, :3])  # (8, 32, 32, C)
    C = p.shape[-1]
    chunks = p.reshape(2, 4, 32, 32, C)
    local = stab.lste(chunks)
    chunk_token = stab.gstra(local.flatten(1, 3))
    dense = (local + chunks).reshape(8, 32, 32, C)
    rows = v[0, 0, 3].nonzero()[:, 0]
    top, bottom = rows.min().item() // 14, rows.max().item() // 14 + 1
    expected = []
    alpha = torch.sigmoid(stab.balance)
    for i in range(8):
        crop = dense[i, top:bottom][None]  # (1, 24, 32, C)
        grid = stab.lsd(crop)[0]  # (12, 16, C)
        frame_token = stab.fsra(grid.reshape(1, -1, C))[0]
        fused = stab.fuse((1 - alpha) * chunk_token[i // 4] + alpha * frame_token)
        expected.append(fused[None])
        for row in grid:
            expected += [row, stab.split_token[None]]
    expected = torch.cat(expected)
    assert n.item() == expected.shape[0] == 8 * 205
    torch.testing.assert_close(tokens[0], expected, rtol=1e-5, atol=1e-5)


def test_pack_left_keeps_order_and_pads():
    t = torch.arange(12.0).view(2, 6, 1)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]]).bool()
    packed, n = pack_left(t, keep)
    assert n.tolist() == [3, 1]
    assert packed[..., 0].tolist() == [[0, 2, 3], [7, 0, 0]]


# --------------------------------------------------------------------------- initialisation

def test_fresh_lste_temporal_branch_and_gstra_outputs_are_zero():
    model = nano()
    lste, gstra = model.stab.lste, model.stab.gstra
    x = torch.randn(3, 2, 4, 4, 32)  # (N, k, h, w, C): LSTE takes channels-last tokens
    x_first = x.permute(0, 4, 1, 2, 3)  # the conv modules' channels-first layout
    branch = lste.expand(lste.temporal(lste.reduce(lste.norm(x_first))))
    assert (branch == 0).all()
    torch.testing.assert_close(lste(x), x + lste.dpe(x_first).permute(0, 2, 3, 4, 1))  # dpe is live from the start
    assert lste.dpe.weight.abs().sum() > 0
    assert (gstra(torch.randn(3, 20, 32)) == 0).all()  # zero query + zero residual outputs
    assert torch.sigmoid(model.stab.balance).eq(0.5).all()


# --------------------------------------------------------------------------- masks

def test_changing_a_later_token_never_changes_earlier_logits():
    model = nano()
    v = videos(model.cfg, B=1)
    ids, _ = prompts([12], 64)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 64
    a, b = model(v, ids), model(v, changed)
    n_vis = a.shape[1] - 12 + 1
    first_changed = 8 + n_vis - 1  # text position 8 after the visual span
    torch.testing.assert_close(a[:, :first_changed], b[:, :first_changed], rtol=0, atol=0)
    assert not torch.allclose(a[:, first_changed:], b[:, first_changed:])


def test_a_sample_gives_the_same_logits_alone_and_in_a_padded_batch():
    model = nano()
    v = videos(model.cfg, B=3)
    ids, lengths = prompts([12, 7, 9], 64)
    batch = model(v, ids, lengths=lengths)
    n_vis = batch.shape[1] - 12 + 1
    for i, n in enumerate(lengths.tolist()):
        alone = model(v[i:i + 1], ids[i:i + 1, :n])
        torch.testing.assert_close(batch[i:i + 1, :n + n_vis - 1], alone, rtol=1e-5, atol=1e-5)


def test_loss_only_counts_answer_tokens_and_matches_logits():
    model = nano()
    v = videos(model.cfg, B=2)
    ids, lengths = prompts([10, 8], 64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:10], labels[1, 5:8] = ids[0, 6:10], ids[1, 5:8]
    loss = model(v, ids, labels, lengths)
    logits = model(v, ids, lengths=lengths)
    n_vis = logits.shape[1] - 10 + 1
    picked = []
    for b, (start, end) in enumerate([(6, 10), (5, 8)]):
        for t in range(start, end):
            pos = t + n_vis - 1  # spliced position of text token t
            picked.append(torch.log_softmax(logits[b, pos - 1], -1)[ids[b, t]])
    torch.testing.assert_close(loss, -torch.stack(picked).mean())
    summed = model(v, ids, labels, lengths, reduction="sum")
    torch.testing.assert_close(summed, loss * len(picked))


# --------------------------------------------------------------------------- generation

def test_generation_stops_at_eos_and_pads_finished_rows():
    model = nano()
    v = videos(model.cfg, B=2)
    ids, lengths = prompts([6, 6], 64)
    free = model.generate(v, ids, lengths, max_new_tokens=5)
    eos = int(free[0, 1])  # make row 0's second token the end of sequence
    out = model.generate(v, ids, lengths, max_new_tokens=5, eos_id=eos)
    assert out[0, 1] == eos and (out[0, 1:] == eos).all()
    row1_stop = (free[1] == eos).nonzero()
    end = int(row1_stop[0]) if len(row1_stop) else 5
    assert torch.equal(out[1, :end], free[1, :end])
    alone = model.generate(v[:1], ids[:1], lengths[:1], max_new_tokens=5, eos_id=eos)
    assert alone.shape[1] == int((free[0] == eos).nonzero()[0]) + 1  # stops once every row has finished


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = nano()
    v = videos(model.cfg, B=1)
    ids, lengths = prompts([6], 64)
    run = lambda seed: model.generate(v, ids, lengths, 8, temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    greedy = model.generate(v, ids, lengths, 8)
    top1 = model.generate(v, ids, lengths, 8, temperature=0.7, top_k=1)
    assert torch.equal(greedy, top1)


# --------------------------------------------------------------------------- the STAB is live

def test_frame_order_matters_and_videos_in_a_batch_are_independent():
    model = nano()
    v = videos(model.cfg, B=3)
    tokens, _ = model.stab(v)
    reordered, _ = model.stab(v[:, [1, 0, 2, 3]])
    n = tokens.shape[1] // model.cfg.n_frames
    # frame 0's tokens move to frame 1's slot; if only order-free maths ran they would match
    assert not torch.allclose(tokens[:, :n], reordered[:, n:2 * n], atol=1e-4)
    alone, _ = model.stab(v[1:2])
    torch.testing.assert_close(tokens[1:2], alone, rtol=1e-5, atol=1e-5)


def test_every_stab_parameter_receives_a_gradient():
    model = nano().train()
    with torch.no_grad():  # leave the zero initialisation, as training would after a step
        for p in model.stab.parameters():
            if (p == 0).all():
                p.normal_(0, 0.02)
    v = videos(model.cfg, B=2)
    ids, lengths = prompts([8, 6], 64)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    model(v, ids, labels, lengths).backward()
    for name, p in model.stab.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fresh_zero_initialised_parameters_get_gradients():
    model = nano().train()
    v = videos(model.cfg, B=2)
    ids, lengths = prompts([8, 6], 64)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    model(v, ids, labels, lengths).backward()
    stab = model.stab
    for p in (stab.lste.expand.weight, stab.gstra.attn.proj.weight, stab.gstra.mlp[-1].weight, stab.balance):
        assert p.grad.abs().sum() > 0


# --------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("shape, message", [
    ((2, 4, 3, 32), "batch, frames"),
    ((2, 4, 5, 32, 32), "3 or 4 channels"),
    ((2, 3, 3, 32, 32), "multiple of chunk_frames"),
    ((2, 4, 3, 40, 40), r"side of patch_size\*lsd_window"),
    ((2, 4, 3, 32, 48), "square"),
])
def test_bad_video_shapes_are_rejected_with_a_clear_message(shape, message):
    model = nano()
    with pytest.raises(ValueError, match=message):
        model.encode_videos(torch.randn(*shape))


def test_prompts_need_exactly_one_placeholder():
    model = nano()
    v = videos(model.cfg, B=2)
    ids, lengths = prompts([6, 6], 64)
    ids[1, 4] = VIDEO_PLACEHOLDER
    with pytest.raises(ValueError, match=r"exactly one <video>.*\[1, 2\]"):
        model(v, ids, lengths=lengths)
    ids[:, [2, 4]] = 5
    with pytest.raises(ValueError, match="exactly one"):
        model(v, ids, lengths=lengths)


def test_a_sequence_longer_than_the_context_is_an_error():
    model = nano(max_seq_len=40)
    v = videos(model.cfg, B=1)
    ids, _ = prompts([20], 64)  # 28 visual + 19 text = 47 > 40
    with pytest.raises(ValueError, match="exceed the decoder's context"):
        model(v, ids)
    ids, _ = prompts([10], 64)  # 37 fits, but not with 8 more
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(v, ids, max_new_tokens=8)


def test_a_mask_that_is_not_one_aligned_rectangle_is_rejected():
    model = paper_geometry()
    v = torch.randn(1, 8, 4, 448, 448)
    v[0, :, 3] = letterbox_mask(448, 300, 448)  # 300 px is not a whole number of 28-px windows
    with pytest.raises(ValueError, match="aligned"):
        model.stab(v)
    v[0, :, 3] = letterbox_mask(448, 336, 448)
    v[0, 5, 3] = 1  # one frame with another box
    with pytest.raises(ValueError, match="same in every frame"):
        model.stab(v)
    v[0, :, 3] = 0
    with pytest.raises(ValueError, match="aligned|no valid pixels"):
        model.stab(v)


def test_unknown_preset_and_impossible_configs_are_errors():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        PandaConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        PandaConfig.preset("nano", n_frames=3)
