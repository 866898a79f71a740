"""One training step's gradients, as train.py computes them, under torchrun (DDP or FSDP) or in one
process: tests/test_distributed.py runs this and compares the two. Every setting the tests need is
computed in one launch (starting torchrun costs more than the steps):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_step.py OUT.pt
    python tests/distributed_step.py OUT.pt        # the reference: one process, the global batch

Per setting, OUT.pt holds {parameter name: full gradient}. Every process of a world of W takes the
global batch's samples of its rank (data.SyntheticQA.batches), so the gradients must be those of one
process with the whole batch, whatever W, the accumulation and the wrapping.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from distillation import teachers  # noqa: E402
from multi_gpu import distributed  # noqa: E402
import train  # noqa: E402
from panda import PandaConfig, VideoPanda  # noqa: E402

GLOBAL_BATCH = 4
# name: (grad_accum, distillation, FSDP). The model has no LSTE: its BatchNorm would normalise by each
# process's own half of the batch on CPUs (SyncBatchNorm syncs on GPUs only).
SETTINGS = {"ddp": (1, "", False), "ddp_accumulated": (2, "", False), "ddp_distilled": (1, "oracle", False),
            "fsdp": (1, "", True)}


def gradients(setting, device, world):
    grad_accum, distilled, fsdp = SETTINGS[setting]
    tokenizer = data.build_tokenizer()
    cfg = PandaConfig.preset("nano", lste=False, vocab_size=tokenizer.get_vocab_size())
    tc = replace(train.TrainConfig(), batch_size=GLOBAL_BATCH // world // grad_accum, grad_accum=grad_accum,
                 questions_per_clip=1, distill=distilled, grad_clip=0.0, fsdp=fsdp and world > 1)
    torch.manual_seed(0)  # the same weights in every process, and in the reference
    model = VideoPanda(cfg)
    tc, head, teacher = teachers.setup(tc, model, None, device)
    if tc.fsdp:
        distributed.shard(model, head, device)
    train_model, train_head = distributed.wrap(model, head, device, tc.fsdp)
    task = data.SyntheticQA(tokenizer, "train", cfg.n_frames, cfg.image_size, 1, cfg.grid)
    rank = distributed.rank_and_world()[0]
    stream = task.batches(0, tc.batch_size, rank, world)
    micro = [next(stream)[0] for _ in range(grad_accum)]
    run = train.Run(tc, None, device, rank, world, model, head, teacher, tokenizer, optimizer=None,
                    data=None, train_model=train_model, train_head=train_head)  # what a step reads
    train.forward_backward(run, micro)
    named = list(model.named_parameters()) + ([] if head is None else
                                              [(f"head.{n}", p) for n, p in head.named_parameters()])
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP: gather the shards
    return {name: full(p.grad).detach().clone() for name, p in named}


def main(out):
    device, rank, world = distributed.init(torch.device("cpu"))
    results = {setting: gradients(setting, device, world) for setting in SETTINGS}
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
    distributed.leave()
