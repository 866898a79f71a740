"""train.py's pieces: --key=value parsing, the learning-rate schedule, token-normalised accumulation,
that the model can fit one batch, that every trainable weight is in an optimizer group and that
every option is sorted for resuming."""

import math
from dataclasses import make_dataclass, replace

import pytest
import torch

import data
from checkpoints import run_files
from panda import IGNORE_INDEX, PandaConfig, VideoPanda
from tools.cli import field_comments, parse_args
from train import TrainConfig, lr_at


def test_overrides_are_typed_and_routed_to_their_config():
    tc, cfg = parse_args(["--max_steps=7", "--lr_stab=0.5", "--lste=false", "--compile=1",
                          "--preset=nano", "--lsd=avgpool"], "", TrainConfig, PandaConfig)
    assert tc == {"max_steps": 7, "lr_stab": 0.5, "compile": True, "preset": "nano"}
    assert cfg == {"lste": False, "lsd": "avgpool"}
    assert isinstance(tc["max_steps"], int) and isinstance(tc["lr_stab"], float)


@pytest.mark.parametrize("arg, message", [
    ("--max_stpes=7", "unknown option --max_stpes; did you mean --max_steps"),
    ("--max_steps=7.5", "--max_steps expects int, got '7.5'"),
    ("--lste=maybe", "--lste expects a bool"),
    ("--lr_stab=fast", "--lr_stab expects float"),
    ("max_steps=7", "options look like --key=value"),
    ("--max_steps", "options look like --key=value"),
])
def test_bad_overrides_are_errors_not_ignored(arg, message):
    with pytest.raises(ValueError, match=message):
        parse_args([arg], "", TrainConfig, PandaConfig)


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    tc = replace(TrainConfig(), warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, tc) == pytest.approx(0.1) and lr_at(500, tc) == pytest.approx(0.1)
    steps = [lr_at(s, tc) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # never rises after the warm-up


def batch(n, start=0):
    tokenizer = data.build_tokenizer()
    return data.SyntheticQA(tokenizer, "train", 4, 32, questions_per_clip=2, grid=2).batch(start, n), tokenizer


def test_accumulating_summed_losses_over_supervised_tokens_equals_one_big_batch():
    """train.py divides each micro-batch's summed loss by the step's supervised-token count."""
    b, tokenizer = batch(4)
    torch.manual_seed(0)
    # eval mode: BatchNorm's batch statistics (train mode) differ between a micro-batch and the whole
    model = VideoPanda(PandaConfig.preset("nano", vocab_size=tokenizer.get_vocab_size())).eval()
    args = lambda sl: (b["videos"][sl], b["input_ids"][sl], b["labels"][sl], b["lengths"][sl])
    model(*args(slice(0, 4))).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    for sl in (slice(0, 1), slice(1, 4)):  # unequal halves: a per-micro-batch mean would be wrong here
        (model(*args(sl), reduction="sum") / n).backward()
    for g, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_the_model_fits_one_batch():
    b, tokenizer = batch(8)
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", vocab_size=tokenizer.get_vocab_size()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    args = (b["videos"], b["input_ids"], b["labels"], b["lengths"])
    first = model(*args).item()
    for _ in range(150):
        loss = model(*args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 2.5 and loss.item() < 0.1, (first, loss.item())


def test_a_run_says_how_long_it_will_take_and_how_to_read_its_accuracies(tmp_path, capsys):
    """After 20 steps one line estimates the rest from the steps' rate; at the end one line says what
    the three accuracies (held-out, test, shuffled frames) measure."""
    import train
    train.main(["--preset=nano", "--device=cpu", "--batch_size=2", "--questions_per_clip=1", "--max_steps=25",
                "--eval_samples=2", "--save_every=0", "--num_workers=0", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    minutes = [line for line in out.splitlines() if line.endswith("more minutes of training")]
    assert len(minutes) == 1 and float(minutes[0].split()[1]) >= 0
    assert "held-out: (shape, colour) pairs training never showed" in out and "shuffled:" in out


def with_an_adapter(model):
    """A --model_hook that adds a module outside the STAB, projector and decoder."""
    model.adapter = torch.nn.Linear(4, 4)
    return model


def test_a_trainable_parameter_in_no_optimizer_group_is_an_error_naming_it(tmp_path):
    """make_optimizer gives the STAB, projector, decoder and head their rates; a module a hook adds
    elsewhere would silently never train, so the run stops before it starts, naming its weights.
    Frozen, the same module is fine."""
    import train
    args = ["--preset=nano", "--device=cpu", "--max_steps=1", "--eval_samples=2", "--save_every=0",
            f"--out_dir={tmp_path}", "--model_hook=tests.test_train.with_an_adapter"]
    with pytest.raises(ValueError, match=r"^adapter\.weight, adapter\.bias: trainable "
                                         r"\(requires_grad\) but in no optimizer group"):
        train.main(args)
    assert not (tmp_path / "ckpt.pt").exists()
    tokenizer = data.build_tokenizer()
    cfg = PandaConfig.preset("nano", vocab_size=tokenizer.get_vocab_size())
    model = with_an_adapter(VideoPanda(cfg))
    model.adapter.requires_grad_(False)
    train.make_optimizer(model, TrainConfig(), True, None)


def test_every_train_option_is_sorted_into_resumable_or_fixed():
    """Whether a resumed run may change an option is decided for each one: an option in neither set
    (or in both) stops train.py as it is imported, naming it."""
    import train
    run_files.check_sorted(TrainConfig, train.RESUMABLE, train.FIXED)
    later = make_dataclass("Later", [("label_smoothing", float, 0.0)], bases=(TrainConfig,))
    with pytest.raises(TypeError, match="in RESUMABLE or FIXED .*: label_smoothing$"):
        run_files.check_sorted(later, train.RESUMABLE, train.FIXED)


def test_a_comment_over_two_lines_is_the_options_whole_help():
    comments = field_comments(TrainConfig)
    assert comments["preset"] == ("model size: nano, tiny or paper (panda.PRESETS); any "
                                  "PandaConfig field also works")
    assert comments["out_dir"] == "ckpt.pt, tokenizer.json and results.json go here"  # its own only
    assert comments["seed"] == "the fresh weights and the data order"  # not the section heading
