"""train.py under torchrun, on CPUs: two processes talking through gloo, as on a machine with two
GPUs they would through NCCL. One step's gradients under DDP and FSDP must be one process's with the
same global batch, scale included; whole runs must end where one process ends, and their checkpoints
must resume. Every run is the nano preset for a few steps.

The model is built without its LSTE (--lste=false) for these comparisons: the LSTE's BatchNorm
normalises by the statistics of the batch, which on GPUs SyncBatchNorm gathers from all processes
(the global batch's, as in one process) but which PyTorch cannot sync on CPUs, where every process
normalises by its own half of the batch."""

import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import distributed as dist

from checkpoints import run_files
import train
from real_video import video_files
from checkpoints import checkpoint_dirs

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

ROOT = Path(__file__).resolve().parents[1]
NANO = ["--preset=nano", "--lste=false", "--device=cpu", "--warmup_steps=1", "--eval_every=1000",
        "--save_every=1000", "--eval_samples=4", "--questions_per_clip=1"]
TOLERANCE = 1e-5  # one process and two sum the same numbers in another order


def torchrun(*options):
    """train.py as torchrun starts it on one machine: two processes, a free port (--standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train.py", *NANO, *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def load(path):
    return run_files.load_checkpoint(path)


def assert_close(expected, actual):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=TOLERANCE, msg=name)


def assert_same_run(expected, actual):
    """Two checkpoints of the same training: same loss, same place in the data, same weights."""
    assert actual["step"] == expected["step"] and actual["data_place"][0] == expected["data_place"][0]
    assert abs(actual["loss"] - expected["loss"]) < TOLERANCE
    assert_close(expected["model"], actual["model"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, batches of 4, three steps."""
    out = tmp_path_factory.mktemp("one")
    train.main(NANO + ["--max_steps=3", "--batch_size=4", f"--out_dir={out}"])
    return load(out / "ckpt.pt")


# --------------------------------------------------------------------------- one step's gradients

@pytest.fixture(scope="module")
def step_gradients(tmp_path_factory):
    """{setting: {parameter: gradient}} of one step (tests/distributed_step.py), under torchrun with two
    processes and in one process with the global batch."""
    out = tmp_path_factory.mktemp("gradients")
    for command, name in ((["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "two.pt"),
                          ([], "one.pt")):
        result = subprocess.run([sys.executable, *command, "tests/distributed_step.py", str(out / name)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return (torch.load(out / "two.pt", weights_only=True), torch.load(out / "one.pt", weights_only=True))


def assert_same_gradients(actual, expected):
    """Each tensor's gradient equal up to rounding: fp32 sums of the same terms in another order differ by
    ~1e-7 of the terms' size. A floor of 1e-7 of the whole gradient's norm covers tensors whose true
    gradient is zero (the distillation head's query, when it attends over a single layer), where only
    rounding noise is left. Clipping and Adam are left out: they would hide a wrong scale."""
    assert actual.keys() == expected.keys()
    total = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name in expected:
        error = (actual[name] - expected[name]).norm()
        assert error <= 1e-5 * expected[name].norm() + 1e-7 * total, f"{name}: {error:.3g} off"


@pytest.mark.parametrize("setting", ["ddp", "ddp_accumulated", "fsdp"])
def test_one_steps_gradients_under_torchrun_are_one_processs(setting, step_gradients):
    """2 processes x 2 samples, 2 processes x 2 micro-batches of 1, and FSDP's reduce-scattered shards:
    the gradient of one process with the 4 samples, its scale included."""
    two, one = step_gradients
    assert_same_gradients(two[setting], one["ddp"])


def test_the_distillation_heads_gradients_under_ddp_are_one_processs(step_gradients):
    two, one = step_gradients
    assert any(name.startswith("head.") for name in one["ddp_distilled"])
    assert_same_gradients(two["ddp_distilled"], one["ddp_distilled"])


def test_the_comparison_would_see_a_doubled_or_halved_gradient(step_gradients):
    _, one = step_gradients
    for factor in (2.0, 0.5):
        with pytest.raises(AssertionError):
            assert_same_gradients({name: factor * g for name, g in one["ddp"].items()}, one["ddp"])


# --------------------------------------------------------------------------- DDP, whole runs

def test_ddp_equals_one_process_with_the_global_batch(one_process, tmp_path):
    """Two processes with batches of 2: the same global batch of 4, three steps."""
    out, log = tmp_path, torchrun("--max_steps=3", "--batch_size=2", f"--out_dir={tmp_path}")
    ckpt = load(out / "ckpt.pt")
    assert_same_run(one_process, ckpt)
    assert len(ckpt["rng"]) == 2  # a random state per process, for an exact resume
    # rank 0 alone logs and writes; both answer the evaluation's questions, which are pooled
    assert log.count("done in") == 1 and log.count("heldout_shuffled:") == 1
    assert "on cpu x 2 processes (DDP)" in log


def test_ddp_with_accumulation_stopped_and_resumed_equals_one_process(one_process, tmp_path):
    """2 processes x 2 micro-batches of 1 = one batch of 4, for two steps, then a resumed third: each
    process goes on from its own place in the data and its own random state, and the three steps are one
    process's three (the loss is normalised by the step's supervised tokens on all processes)."""
    torchrun("--max_steps=2", "--batch_size=1", "--grad_accum=2", f"--out_dir={tmp_path}")
    assert load(tmp_path / "ckpt.pt")["data_place"] == [8, 8]
    torchrun("--init_from=resume", "--max_steps=3", f"--out_dir={tmp_path}")
    resumed = load(tmp_path / "ckpt.pt")
    assert resumed["data_place"] == [12, 12] and len(resumed["rng"]) == 2
    assert_same_run(one_process, resumed)


# --------------------------------------------------------------------------- FSDP

def test_fsdp_equals_one_process_and_its_sharded_checkpoint_resumes(one_process, tmp_path):
    """FSDP2 over two processes for two steps (recomputing blocks in backward), a DCP checkpoint,
    a resumed third step and an export: the weights of one process's three steps."""
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    torchrun("--fsdp=true", "--grad_checkpoint=true", "--max_steps=2", "--batch_size=2", f"--out_dir={tmp_path}")
    assert not (tmp_path / "ckpt.pt").exists() and (tmp_path / "ckpt_dcp" / ".metadata").is_file()
    # A save cut between its two renames leaves only ckpt_dcp.old, which is complete: the run goes on from it.
    (tmp_path / "ckpt_dcp").rename(tmp_path / "ckpt_dcp.old")
    log = torchrun("--init_from=resume", "--fsdp=true", "--max_steps=3", f"--export={tmp_path / 'export'}",
                   f"--out_dir={tmp_path}")
    assert "on cpu x 2 processes (FSDP)" in log and "steps 2 -> 3" in log
    assert not (tmp_path / "ckpt_dcp.old").exists()
    # the folder, made into one file as its docstring says: ckpt.pt's "model" and "optimizer"
    dcp_to_torch_save(tmp_path / "ckpt_dcp", tmp_path / "full.pt")
    ckpt = torch.load(tmp_path / "full.pt", weights_only=True) | run_files.load_checkpoint(tmp_path / "ckpt_dcp" / "train_state.pt", keys=())
    assert_same_run(one_process, ckpt)
    assert [s["step"].item() for s in ckpt["optimizer"]["state"].values()] == [3] * len(ckpt["optimizer"]["state"])
    exported, _ = checkpoint_dirs.from_pretrained(tmp_path / "export")  # gathered to rank 0 and written there
    assert_close(one_process["model"], exported.state_dict())


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        train.main(NANO + ["--fsdp=true", "--max_steps=1", f"--out_dir={tmp_path}"])


# --------------------------------------------------------------------------- real data, in shares

class Numbered(torch.utils.data.Dataset):
    """Stand-in instruction data: sample i is a blank clip with the id i; the ids in `broken` fail."""

    def __init__(self, n, broken=()):
        self.n, self.broken = n, set(broken)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.broken:
            return {"id": i, "skipped": "unreadable"}
        return {"id": i, "video": torch.zeros(2, 3, 4, 4), "input_ids": [1, 2], "labels": [-100, 2]}


def take(batches, n):
    """The first n of video_files.batches: (sample ids, epoch, position) each."""
    return [(batch["id"], *place) for batch, place in islice(batches, n)]


def shares(dataset, batch_size, place=(0, 0), skipped=None, rank=0, world=1):
    plan = video_files.BatchPlan(batch_size, 1337, rank, world, num_workers=0)
    return video_files.batches(dataset, plan, place, "skip", [] if skipped is None else skipped)


def test_real_data_shares_make_the_global_batch():
    """Process r of 2 takes every other sample of the epoch's order from the r-th: the k-th batches
    of both are together the k-th batch of one process with the global batch. Each process keeps
    its own place: with 9 samples, process 0 has 5 and process 1 only 4, and goes on into epoch 1."""
    dataset = Numbered(9)
    one = take(shares(dataset, 4), 3)  # 4 + 4 + 1 samples
    first, second = (take(shares(dataset, 2, rank=rank, world=2), 3) for rank in (0, 1))
    for k in range(2):
        assert sorted(first[k][0] + second[k][0]) == sorted(one[k][0])
    assert first[2] == (one[2][0], 0, 5)  # the epoch's last sample
    assert second[2][1:] == (1, 2)  # process 1's share of epoch 1's order
    # a resumed share goes on where it stopped: process 1, epoch 0, 2 of its 4 samples used
    batch, place = next(shares(dataset, 2, (0, 2), rank=1, world=2))
    assert (batch["id"], *place) == second[1]


def test_real_data_share_with_a_skipped_sample_still_yields_batches():
    """A process whose share holds an unusable sample yields smaller batches, never none, so it
    keeps in step with the others (the step's loss is normalised by the global token count)."""
    order = np.random.default_rng([1337, 0]).permutation(8)  # the epoch's order; process 1 takes 1, 3, 5, 7
    skipped = []
    batches = shares(Numbered(8, broken={int(order[1])}), 2, skipped=skipped, rank=1, world=2)
    assert take(batches, 1) == [([int(order[3])], 0, 2)] and len(skipped) == 1
