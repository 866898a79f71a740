"""Several processes: DDP and FSDP under torchrun, and FSDP's sharded checkpoints (DCP).

torchrun starts one process per GPU, all running train.py, and tells each its RANK (0 ..
WORLD_SIZE-1 over all machines), its LOCAL_RANK (its GPU on its machine) and where to meet
(MASTER_ADDR, MASTER_PORT). A plain `python train.py` is rank 0 of a world of 1, and every function
here then does what one process needs (usually nothing). docs/DISTRIBUTED.md has the commands.
"""

import contextlib
import gc
import os
import shutil

import torch
from torch import distributed as dist
from torch import nn

from checkpoints import run_files


def init(device, fsdp=False):
    """(device, rank, world_size). Each process joins the group on GPU LOCAL_RANK, NCCL between
    GPUs, gloo between CPU processes. fsdp: --fsdp=true, which shards over torchrun's processes."""
    if fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise ValueError("--fsdp=true shards the model over the processes of torchrun: run "
                         "torchrun --standalone --nproc_per_node=N train.py ... "
                         "(docs/DISTRIBUTED.md)")
    if "RANK" not in os.environ:
        return device, 0, 1
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"torchrun trains on GPUs (NCCL) or on CPUs (gloo), not on {device.type}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        # the GPU that .cuda(), NCCL and the CUDA random state mean from now on
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def leave():
    """The end of a torchrun process. Whatever holds the process group (DDP, FSDP's modules and
    their sharded parameters) must be gone before the group is destroyed: a group that outlives its
    destruction keeps gloo's threads running into the interpreter's exit, which then aborts now and
    then ("terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()  # main()'s models: FSDP's hold themselves in reference cycles
        dist.destroy_process_group()


def all_sum(values, device):
    """The numbers summed over all processes (one all-reduce for the list); in a world of 1,
    themselves."""
    if not dist.is_initialized():
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def all_finite(tensors, device):
    """Whether the tensors hold no inf or NaN on any process (each checks its own shards)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: DTensor shards
    return not all_sum([float(not all(torch.isfinite(t).all() for t in local))], device)[0]


def gather(obj):
    """[rank 0's obj, rank 1's, ...]: a small picklable object of every process, on each."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


DDP = nn.parallel.DistributedDataParallel


def sync_batch_norm(model, device):
    """The model with its BatchNorm layers (the LSTE's) as SyncBatchNorm when several GPUs train it.
    BatchNorm normalises by statistics of the batch: SyncBatchNorm's are those of the global batch,
    gathered from all processes, as one process with the whole batch would compute them. PyTorch
    syncs them on GPUs only: on CPUs every process normalises by its own batch's statistics."""
    if dist.is_initialized() and dist.get_world_size() > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(model, head, device, fsdp):
    """The modules the training loop calls: under DDP, the model and the distillation head each
    in DDP (the head runs outside the model's forward); under FSDP, themselves, sharded in place."""
    if not dist.is_initialized() or fsdp:
        return model, head
    gpu = [device.index] if device.type == "cuda" else None
    # DDP broadcasts rank 0's weights (and BatchNorm running averages) to all, then averages the
    # gradients over the processes bucket by bucket during backward, overlapping the rest of it.
    return DDP(model, device_ids=gpu), None if head is None else DDP(head, device_ids=gpu)


def gradient_sync(modules, sync):
    """Context for one micro-batch's forward and backward. DDP all-reduces the gradients during
    every backward; while micro-batches accumulate, once, after the last one, is enough, and
    no_sync() skips the others (the gradients accumulate locally in .grad, and the last all-reduce
    averages the sums)."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in modules:
            if isinstance(module, DDP):
                stack.enter_context(module.no_sync())
    return stack


def shard(model, head, device):
    """FSDP2, in place: every decoder block becomes a unit of its own, and the root unit takes the
    rest (STAB, projector, embeddings, final norm, LM head). Between uses each process keeps
    1/world_size of every weight, gradient and Adam moment; a unit's full weights exist only while
    it runs (all-gathered just before its forward and its backward, freed after), and its gradients
    are reduce-scattered (each process receives the average over processes of its own slice), so the
    gradient maths is DDP's. A 7B model's 16 bytes per parameter of fp32 training state (weight,
    gradient, two Adam moments) is 112 GB on one GPU, 14 GB on each of eight. While micro-batches
    accumulate, FSDP reduce-scatters after each one: set_requires_gradient_sync(False) would save
    that traffic, but only by keeping whole unsharded gradients, the memory FSDP is here to save."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # not in every build
    # On GPUs the units compute in bf16, gathered as bf16 (half the traffic); the sharded master
    # weights and the gradient reduction stay fp32. On CPUs everything stays fp32.
    bf16 = device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    for block in model.decoder.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if head is not None:  # a root of its own: it runs outside the model's forward
        fully_shard(head, mp_policy=policy)


def sharded_state(model, head, optimizer):
    """What DCP saves of an FSDP run, named as in ckpt.pt: {"model", "optimizer"(, "distill_head")}.
    Every tensor is this process's shard (a DTensor) under its parameter's name in the plain model,
    and the optimizer state is keyed by parameter names, not positions: the files say nothing of how
    the model was sharded, and DCP can load them into another sharding (another number of GPUs)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    # the optimizer's parameters
    owner = nn.ModuleDict({"model": model} | ({} if head is None else {"head": head}))
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(owner, optimizer)}
    if head is not None:
        state["distill_head"] = get_model_state_dict(head)
    return state, owner


def checkpoint_folder(path):
    """The complete sharded checkpoint of an out_dir: ckpt_dcp/, or while save_sharded swaps a new
    one in, ckpt_dcp.old/ (complete too); None when there is neither."""
    for folder in (path, path.with_name(path.name + ".old")):
        if (folder / "train_state.pt").is_file():
            return folder
    return None


def resume_file(out, fsdp):
    """The file a resumed run reads: out/ckpt.pt, or with --fsdp=true the train_state.pt of the
    sharded folder. A sharded folder is read only when the command line asks for one: DCP reads its
    .metadata with pickle, which can run code, so a ckpt_dcp/ someone put in out_dir is not opened
    on its own."""
    folder = checkpoint_folder(out / "ckpt_dcp")
    if fsdp:
        return (folder or out / "ckpt_dcp") / "train_state.pt"
    if folder and not (out / "ckpt.pt").exists():
        raise FileNotFoundError(f"{folder} is a sharded (--fsdp) run's checkpoint: resume it with "
                                "--fsdp=true under torchrun, which reads its .metadata, a pickle: "
                                "only for folders you made")
    return out / "ckpt.pt"


def save_sharded(path, model, head, optimizer, train_state):
    """The --fsdp checkpoint, a folder: with torch.distributed.checkpoint (DCP) every process writes
    its own shards of the weights and the optimizer state, in parallel, and rank 0 adds
    train_state.pt (step, data position, random states, configs) last, which marks the folder
    complete. It is written as path.tmp; then the old folder moves to path.old, the new one to path,
    and path.old is removed: at every moment one complete folder is there for checkpoint_folder() to
    find. Several machines: out_dir must be one shared filesystem. For sample.py and the next stage,
    --export writes the whole model at the end of the run;
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save gathers the shards into one
    torch.save file."""
    import torch.distributed.checkpoint as dcp
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left behind
    dist.barrier()  # nobody writes into tmp before it is cleared
    # returns once every process has written
    dcp.save(sharded_state(model, head, optimizer)[0], checkpoint_id=tmp)
    if dist.get_rank() == 0:
        run_files.save_checkpoint(tmp / "train_state.pt", train_state)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            # a folder cannot be renamed onto a non-empty one: the old one moves aside
            os.replace(path, old)
        os.replace(tmp, path)
        run_files.sync_directory(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # the folder is in place before anyone goes on (and could be killed)


def load_sharded(path, model, head, optimizer):
    """Fill an FSDP model, its head and their optimizer from save_sharded's folder: each process
    reads the parts of the saved tensors that its own shards hold. The folder's .metadata file is a
    pickle that DCP writes and reads by design: resume only from sharded checkpoints you made."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    state, owner = sharded_state(model, head, optimizer)  # this run's shards, to be filled in place
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(owner, optimizer, state["optimizer"])
    if head is not None:
        set_model_state_dict(head, state["distill_head"])


def whole_model(model, fsdp, rank0_only=False):
    """The model itself, or under FSDP a whole plain copy, gathered (every process takes part): on
    every process on its device, or with rank0_only on rank 0 alone in CPU memory (None elsewhere),
    which is how a 7B model is exported. generate() cannot run on the sharded model itself: each
    block's forward is a collective, and one process may stop generating (every answer finished)
    before another."""
    if not fsdp:
        return model
    state = unsharded(model, rank0_only)
    if state is None:
        return None
    copy = run_files.uninitialised_model(model.cfg, torch.float32,
                                      "cpu" if rank0_only else next(iter(state.values())).device)
    copy.load_state_dict(state)
    return copy


def unsharded(model, rank0_only=False):
    """The full state_dict of an FSDP model, all-gathered: on every process, or on rank 0 alone
    (None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    return None if rank0_only and dist.get_rank() != 0 else state
