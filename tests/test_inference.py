"""fast_inference.fuse: the decoder with q/k/v and gate/up each one matmul, and o and down split for one token,
computes the plain decoder's function: the same logits up to rounding and the same greedy tokens, for
Llama-style heads, grouped-query attention with q/k/v biases (Qwen2) and a head_dim of its own (Mistral)."""

import copy

import pytest
import torch

from gpu_speed import fast_inference
from panda import VIDEO_PLACEHOLDER, PandaConfig, VideoPanda


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=2, qkv_bias=True), dict(head_dim=12)])
def test_the_fused_decoder_gives_the_same_logits_and_greedy_tokens(overrides):
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", n_heads=4, **overrides)).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():  # the init's zero biases would hide a misplaced one
            p.normal_(0, 0.2)
    plain_state = copy.deepcopy(model.state_dict())
    fused = fast_inference.fuse(copy.deepcopy(model))
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


@pytest.mark.parametrize("bias", [False, True])
def test_a_split_product_is_the_linears_product(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias)
    split = fast_inference.SplitLinear(linear)
    one, many = torch.randn(1, 1, 96), torch.randn(2, 3, 96)
    with torch.no_grad():
        want = linear(one)
        assert ((split.split_product(one) - want).norm() / want.norm()).item() < 1e-5  # fp32 sums, reordered
        assert torch.equal(split(one), want) and torch.equal(split(many), linear(many))  # eager: the plain call
    assert split.weight is linear.weight and list(split.state_dict()) == list(linear.state_dict())


def test_the_compiled_decode_step_splits_o_and_down_and_keeps_the_greedy_tokens():
    # backend="eager" runs what the compiler traces, with no kernels to build: the split path, on a CPU
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", n_heads=4)).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0, 0.2)
    fused = fast_inference.fuse(copy.deepcopy(model))
    graphs = []
    fused.decode_step = torch.compile(fused.decode_step, backend=lambda gm, _: graphs.append(gm) or gm.forward,
                                      fullgraph=True)
    g = torch.Generator().manual_seed(1)
    videos, ids = torch.randn(1, 4, 3, 32, 32, generator=g), torch.randint(0, 64, (1, 9), generator=g)
    ids[:, 2] = VIDEO_PLACEHOLDER
    assert torch.equal(model.generate(videos, ids, max_new_tokens=12), fused.generate(videos, ids, max_new_tokens=12))
    linears = [n for n in graphs[0].graph.nodes if n.target is torch.nn.functional.linear]
    assert len(graphs) == 1 and len(linears) == 2 * model.cfg.n_layers + 1  # q/k/v, gate/up, lm_head: o, down split


def test_the_tuner_is_sent_to_the_kernels_gpu_time(monkeypatch):
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    asked = []
    monkeypatch.setattr(CachingAutotuner, "bench", lambda self, launcher, *args, with_profiler=False, **kwargs:
                        asked.append(with_profiler) or 1.0)
    fast_inference.tune_on_kernel_time()  # monkeypatch puts inductor's own bench back afterwards
    assert CachingAutotuner.bench(None, None) == 1.0 and asked == [True]


def test_the_decode_options_are_settings_the_compiler_knows():
    # Without a GPU the decode step is never compiled here: a misspelt option would only fail on one.
    with torch._inductor.config.patch(fast_inference.DECODE_OPTIONS):
        assert torch._inductor.config.realize_acc_reads_threshold == 1
    with pytest.raises((AttributeError, KeyError)):
        with torch._inductor.config.patch({"realize_acc_read_threshold": 1}):
            pass
