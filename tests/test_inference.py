"""inference.fuse: the decoder with q/k/v and gate/up each one matmul computes the plain decoder's
function: the same logits up to rounding and the same greedy tokens, for Llama-style heads, grouped-query
attention with q/k/v biases (Qwen2) and a head_dim of its own (Mistral)."""

import copy

import pytest
import torch

import inference
from panda import VIDEO_PLACEHOLDER, PandaConfig, VideoPanda


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2, qkv_bias=True), dict(head_dim=12)])
def test_the_fused_decoder_gives_the_same_logits_and_greedy_tokens(overrides):
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", n_heads=4, **overrides)).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():  # the init's zero biases would hide a misplaced one
            p.normal_(0, 0.2)
    plain_state = copy.deepcopy(model.state_dict())
    fused = inference.fuse(copy.deepcopy(model))
    g = torch.Generator().manual_seed(1)
    videos = torch.randn(2, 4, 3, 32, 32, generator=g)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    ids[:, 2] = VIDEO_PLACEHOLDER
    lengths = torch.tensor([9, 6])
    with torch.no_grad():
        a, b = model(videos, ids), fused(videos, ids)
    assert ((a - b).norm() / a.norm()).item() < 1e-5  # fp32: the same products, summed in another order
    assert torch.equal(model.generate(videos, ids, lengths, max_new_tokens=10),
                       fused.generate(videos, ids, lengths, max_new_tokens=10))
    assert all(torch.equal(t, plain_state[name]) for name, t in model.state_dict().items())  # the original untouched
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name in fused.state_dict())


def test_the_decode_options_are_settings_the_compiler_knows():
    # Without a GPU the decode step is never compiled here: a misspelt option would only fail on one.
    with torch._inductor.config.patch(inference.DECODE_OPTIONS):
        assert torch._inductor.config.realize_acc_reads_threshold == 1
    with pytest.raises((AttributeError, KeyError)):
        with torch._inductor.config.patch({"realize_acc_read_threshold": 1}):
            pass
