"""Distillation (paper Sec. 3.2, Eq. 18-19; the release's `VideoCompressor`): while training, a
small head reads the decoder's hidden states at every visual grid token and is pulled towards a
frozen teacher's feature for the same cell of the same frame, loss 1 - cosine. The release distils
in all three stages, weight 1, from a frozen ViT-L/14 (LanguageBind). Nothing here runs at
inference.

    teacher(batch) -> (B, T, g, g, D) features   a frozen callable: the oracle below, or a ViT
    DistillHead(hidden states at the grid tokens) -> (..., D) predictions
    loss = 1 - cosine(prediction, teacher feature), per frame the mean over its valid cells

Teachers: make_teacher("oracle", cfg) reads the synthetic task's ground truth;
make_teacher("vit", cfg, path=DIR) loads a CLIP-layout vision tower (ViT, ViTTeacher) from a local
Hugging Face checkpoint. load_release_head starts the head from the release's VideoCompressor
weights. docs/distillation.md tells the whole story.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data
from checkpoints.run_files import CheckpointError
from panda import VIDEO_PLACEHOLDER, FastPatchEmbed
from real_video import letterbox_tokens


class DistillHead(nn.Module):
    """The release's VideoCompressor: predicts a frozen teacher's feature for every visual grid
    token from the decoder's hidden states there. It taps the hidden states L, L-4, ..., 0 of an
    L-layer decoder (0 = the input embeddings, L = the final normed output); the last tap queries
    the others by attention over the layer axis, and a linear map of it is the base the result adds
    to."""

    def __init__(self, cfg, teacher_dim, every=4, heads=8):
        super().__init__()
        if teacher_dim % heads:
            raise ValueError(f"the teacher's width {teacher_dim} must be a multiple of the head's "
                             f"{heads} heads")
        # 32 layers: [32, 28, ..., 4, 0]
        self.taps, self.heads = [*range(cfg.n_layers, 0, -every), 0], heads
        self.norm_layer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.d_model),
                          nn.Linear(cfg.d_model, teacher_dim, bias=False))
            for _ in self.taps)
        self.input_layer = nn.Linear(cfg.d_model, teacher_dim)
        self.output_layer = nn.Linear(teacher_dim, teacher_dim)

    def forward(self, hidden):  # hidden[i] (N, d_model) for each i in self.taps -> (N, teacher_dim)
        s = torch.stack([norm(hidden[i]) for norm, i in zip(self.norm_layer, self.taps)], 1)
        N, n, D = s.shape  # (N, taps, D)
        s = s.view(N, n, self.heads, D // self.heads).transpose(1, 2)  # (N, heads, taps, D/heads)
        # Parameter-free: the final layer's projection is the query, the other taps are keys and
        # values. The release scales the logits by D^-0.5 over the full width, not over the head's
        # D/heads.
        o = F.scaled_dot_product_attention(s[:, :, :1], s[:, :, 1:], s[:, :, 1:], scale=D ** -0.5)
        return self.input_layer(hidden[self.taps[0]]) + self.output_layer(o.reshape(N, D))


def grid_positions(cfg, start, valid=None):
    """Where every frame's grid tokens sit in the spliced sequence, skipping the fused token and the
    split tokens. start (B,): the index of each prompt's video placeholder; valid (B, g, g): the
    letterbox cells (None: all). -> (B, T, g, g) positions, -1 outside the valid box. A frame is
    1 + h * (w + split) tokens, [fused, row 0 and its split, row 1, ...], frames one after
    another."""
    if valid is None:
        valid = torch.ones(len(start), cfg.grid, cfg.grid, dtype=torch.bool, device=start.device)
    rows, cols = valid.any(2), valid.any(1)  # (B, g) each: which rows and columns the box spans
    width = cols.sum(1) + cfg.split_tokens  # (B,) tokens per row
    per_frame = 1 + rows.sum(1) * width  # (B,)
    row, col = rows.cumsum(1) - 1, cols.cumsum(1) - 1  # (B, g) each: index inside the box
    # (B, g, g), after the fused token
    in_frame = 1 + row[:, :, None] * width[:, None, None] + col[:, None, :]
    frames = torch.arange(cfg.n_frames, device=start.device)
    frame_start = start[:, None] + frames * per_frame[:, None]  # (B, T)
    return (frame_start[:, :, None, None] + in_frame[:, None]).masked_fill(~valid[:, None], -1)


def cosine_loss(pred, target, valid=None):
    """Per frame, 1 - the mean cosine similarity over its grid cells; then the mean over frames (the
    release's; Eq. 19 writes the negative cosine, the same up to a constant). pred, target
    (B, T, g, g, D); valid (B, g, g) bool letterbox cells or None (all)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, T, g, g)
    if valid is None:
        return 1 - cos.mean()
    weight = valid[:, None].float()
    return 1 - ((cos * weight).sum((2, 3)) / weight.sum((2, 3))).mean()


def distill_loss(head, teacher, batch, hidden, model):
    """The distillation term of one batch: the head's predictions at every frame's grid tokens
    against the frozen teacher's features (B, T, g, g, D) of the same frames."""
    videos, dev, g = batch["videos"], hidden[0].device, model.cfg.grid
    valid = letterbox_tokens.valid_cells(videos, g)  # None without letterboxing
    valid = None if valid is None else valid.to(dev)
    start = (batch["input_ids"] == VIDEO_PLACEHOLDER).int().argmax(1).to(dev)
    pos = grid_positions(model.cfg, start, valid)  # (B, T, g, g)
    # (B, T*g*g, 1); cells outside the box are masked below
    index = pos.clamp(min=0).flatten(1)[..., None]
    taps = getattr(head, "module", head).taps  # the head's, under torchrun's DDP the wrapped head's
    picked = {i: hidden[i].gather(1, index.expand(-1, -1, hidden[i].shape[-1])).flatten(0, 1)
              for i in taps}
    pred = head(picked).view(*pos.shape, -1)  # (B, T, g, g, D)
    with torch.no_grad():
        target = teacher(batch).to(dev)
    return cosine_loss(pred, target, valid)


def setup(tc, model, ckpt, device):
    """(tc, head, teacher) for train.py's options: the head and its frozen teacher, or None, None.
    --distill=auto means the oracle on the synthetic task, the ViT of --teacher on real data."""
    if tc.distill == "auto":
        tc = replace(tc, distill=("vit" if tc.teacher else "") if tc.data else "oracle")
    if tc.teacher and tc.distill != "vit" or tc.distill == "vit" and not tc.data:
        raise ValueError("--teacher=DIR is the ViT that distils on real data (--data): with "
                         "--distill=auto or vit")
    if not tc.distill:
        return tc, None, None
    teacher, teacher_dim = make_teacher(tc.distill, model.cfg, path=tc.teacher, device=device)
    head = DistillHead(model.cfg, teacher_dim).to(device)
    if ckpt is not None and not tc.fsdp:
        try:
            head.load_state_dict(ckpt["distill_head"])
        except (RuntimeError, TypeError, AttributeError) as err:  # missing keys, shapes, not a dict
            raise CheckpointError(f"{tc.out_dir}/ckpt.pt: its distill_head does not fit this run's "
                                  f"head: {' '.join(str(err).split())[:200]}") from None
    elif ckpt is None and tc.init_from != "scratch" and is_release(tc.init_from):
        load_release_head(head, tc.init_from)  # the release's trained head, to go on from
    return tc, head, teacher


def make_teacher(name, cfg, path="", device="cpu"):
    """(teacher, its feature width). teacher(batch) -> frozen per-cell features (B, T, g, g, D) of
    the batch's clips on the LSD grid. name: "oracle", the synthetic task's ground truth (below),
    or "vit", the CLIP-layout vision tower in the checkpoint directory `path`, run on `device`
    (vit_teacher)."""
    if name == "vit":
        teacher = vit_teacher(path, cfg, device)
        return teacher, teacher.dim
    if name != "oracle":
        raise ValueError(f"--distill must be auto, empty (off), oracle or vit, got {name!r}")

    def oracle(batch):
        if "samples" not in batch:
            raise ValueError("--distill=oracle reads the synthetic task's ground truth; real data "
                             "has none")
        return torch.from_numpy(np.stack([oracle_features(s, cfg.grid) for s in batch["samples"]]))
    return oracle, len(ORACLE_FEATURES)


# ------------------------------------------------------------------------------------ the oracle

# The oracle's feature channels, in order: D = 24 (a multiple of the distillation head's 8 heads).
# A real teacher (the release's LanguageBind ViT) adds learned position embeddings to its patches,
# so its per-patch features say where each patch is; the row and column one-hots are the oracle's
# version.
MAX_ORACLE_GRID = 4
ORACLE_FEATURES = (*data.SHAPES, *data.COLORS, *data.DIRECTIONS, "still", "visible", "coverage",
                   *(f"row {i}" for i in range(MAX_ORACLE_GRID)),
                   *(f"column {i}" for i in range(MAX_ORACLE_GRID)))


def oracle_features(sample, grid):
    """A perfect frozen 'teacher' read off the synthetic task's ground truth instead of the pixels:
    float32 (T, grid, grid, 24) for a grid x grid cell layout (the model's LSD grid,
    PandaConfig.grid). Per cell, the object covering most of it gives one-hots of its shape, its
    colour in that frame and its motion (left, right, up, down or still), then 1 ("visible": an
    object is seen here) and the fraction of the cell it covers; every cell, empty or not, also
    gets one-hots of its row and column (channels ORACLE_FEATURES). Empty cells carry only their
    position."""
    T, size = sample.video.shape[:2]
    if size % grid or grid > MAX_ORACLE_GRID:
        raise ValueError(f"a {size}-pixel frame must split into grid x grid whole cells with "
                         f"grid <= {MAX_ORACLE_GRID}; got grid {grid}")
    cell, channel = size // grid, {name: i for i, name in enumerate(ORACLE_FEATURES)}
    n_objects, n_features = len(sample.objects), len(ORACLE_FEATURES)
    coverage = np.zeros((n_objects, T, grid, grid))  # (O, T, g, g)
    features = np.zeros((n_objects, T, n_features), dtype=np.float32)  # (O, T, D)
    for i, obj in enumerate(sample.objects):
        for t in np.flatnonzero(obj.visible):  # the very masks data.render() paints
            radius = data.object_radius(size)
            mask = data.shape_mask(obj.shape, obj.centers[t], radius, size)  # (H, W)
            coverage[i, t] = mask.reshape(grid, cell, grid, cell).mean((1, 3))
            hot = [obj.shape, obj.colors[t], obj.direction or "still", "visible"]
            features[i, t, [channel[name] for name in hot]] = 1
    # (T, g, g): the object covering most of each cell (objects never overlap)
    best = coverage.argmax(0)
    out = features[best, np.arange(T)[:, None, None]]  # (T, g, g, D)
    out[..., channel["coverage"]] = coverage.max(0)
    out[coverage.max(0) == 0] = 0
    rows, cols = np.arange(grid)[:, None], np.arange(grid)[None, :]  # (g, 1), (1, g)
    out[:, rows, cols, channel["row 0"] + rows] = 1
    out[:, rows, cols, channel["column 0"] + cols] = 1
    return out


# -------------------------------------------------------------------------------- the ViT teacher

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # by Hugging Face's hidden_act names


@dataclass
class ViTConfig:
    """The shape of a CLIP-layout vision transformer. The defaults are CLIP ViT-L/14 at 224 px, the
    shape of the release's teacher (LanguageBind's image and video towers are CLIP ViT-L/14s)."""
    width: int = 1024          # token width
    layers: int = 24
    heads: int = 16
    mlp: int = 4096            # the MLP's hidden width
    patch: int = 14            # patch side in pixels: the patch embedding's kernel and stride
    image: int = 224           # frames are image x image pixels
    act: str = "quick_gelu"    # the MLP's activation: quick_gelu (OpenAI's CLIP) or gelu
    eps: float = 1e-5          # LayerNorm epsilon

    def __post_init__(self):
        if self.image % self.patch or self.width % self.heads or self.act not in ACTIVATIONS:
            raise ValueError(f"a ViT needs image % patch == 0, width % heads == 0 and act in "
                             f"{sorted(ACTIVATIONS)}; got image {self.image}, patch {self.patch}, "
                             f"width {self.width}, heads {self.heads}, act {self.act!r}")

    @property
    def grid(self):  # patches per side
        return self.image // self.patch


class ViT(nn.Module):
    """CLIP's vision transformer (Radford et al. 2021) with Hugging Face's CLIPVisionModel tensor
    names, less its `embeddings.` and `encoder.` levels: a patch embedding without bias, a class
    token and learned positions, a LayerNorm before the layers, then pre-LN layers of attention and
    MLP. Random weights from the constructor; load_vit_weights fills them from a checkpoint.
    CLIPVisionModel's post_layernorm normalises only the pooled class token, which nothing here
    reads: it is not built."""

    def __init__(self, vc):
        super().__init__()
        self.vc = vc
        # the STAB's patch embedding: a Conv2d computed as one matmul
        self.patch_embedding = FastPatchEmbed(vc.width, vc.patch)
        self.class_embedding = nn.Parameter(torch.randn(vc.width))
        # the class token's position, then each patch's
        self.position_embedding = nn.Embedding(vc.grid ** 2 + 1, vc.width)
        self.pre_layrnorm = nn.LayerNorm(vc.width, eps=vc.eps)  # sic: Hugging Face's spelling
        self.layers = nn.ModuleList(ViTLayer(vc) for _ in range(vc.layers))

    def forward(self, frames, n_layers=None):
        """frames (N, 3, S, S) -> the tokens after the first n_layers layers (all: None),
        (N, 1 + g*g, width), the class token first, then the patches row by row: Hugging Face's
        hidden_states[n_layers]."""
        x = self.patch_embedding(frames.to(self.patch_embedding.weight.dtype))  # (N, g, g, width)
        x = x.flatten(1, 2)  # (N, g*g, width), row by row as Hugging Face's conv output flattens
        class_token = self.class_embedding.expand(len(x), 1, -1)  # (N, 1, width)
        x = torch.cat([class_token, x], 1) + self.position_embedding.weight
        x = self.pre_layrnorm(x)
        for layer in self.layers[:n_layers]:
            x = layer(x)
        return x


class ViTLayer(nn.Module):
    """One pre-LN transformer layer of CLIP's vision tower (Hugging Face's CLIPEncoderLayer, same
    tensor names): x + attention(LN(x)), then x + MLP(LN(x)), attention scaled by head_dim^-0.5."""

    def __init__(self, vc):
        super().__init__()
        self.heads, self.act = vc.heads, ACTIVATIONS[vc.act]
        self.layer_norm1 = nn.LayerNorm(vc.width, eps=vc.eps)
        self.self_attn = nn.ModuleDict({name: nn.Linear(vc.width, vc.width)
                                        for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm2 = nn.LayerNorm(vc.width, eps=vc.eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(vc.width, vc.mlp),
                                  "fc2": nn.Linear(vc.mlp, vc.width)})

    def forward(self, x):  # (N, L, width) -> (N, L, width)
        N, L, C = x.shape
        h, attn = self.layer_norm1(x), self.self_attn
        q, k, v = (attn[name](h).view(N, L, self.heads, C // self.heads).transpose(1, 2)
                   for name in ("q_proj", "k_proj", "v_proj"))  # (N, heads, L, C/heads) each
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, C)
        x = x + attn["out_proj"](o)
        return x + self.mlp["fc2"](self.act(self.mlp["fc1"](self.layer_norm2(x))))


def teacher_dtype(device):
    """bf16 on CUDA, as the release keeps its teacher; fp32 elsewhere, where bf16 matmuls are
    slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class ViTTeacher:
    """The release's frozen teacher: a CLIP-layout ViT's tokens hidden_states[-2] (the release's
    mm_vision_select_layer: the input to the last layer, before any final norm) at every patch of
    every frame, the class token dropped: teacher(batch) -> (B, T, g, g, D). g, the ViT's patch
    grid, must be the student's LSD grid (224-px frames in 14-px patches: 16 x 16, as 448-px frames
    in 28-px LSD windows), so that teacher patch (r, c) and student cell (r, c) cover the same part
    of the frame. A plain object, not an nn.Module: it never reaches the optimizer, a checkpoint or
    DDP/FSDP."""

    def __init__(self, vit, cfg):
        vc = vit.vc
        if vc.grid != cfg.grid:
            raise ValueError(f"the teacher's {vc.image}-px frames in {vc.patch}-px patches make a "
                             f"{vc.grid}x{vc.grid} grid, the student's LSD grid is "
                             f"{cfg.grid}x{cfg.grid}: they must pair cell for cell")
        self.device = next(vit.parameters()).device
        self.vit = vit.to(teacher_dtype(self.device)).eval().requires_grad_(False)
        self.cfg, self.image_size, self.dim = cfg, vc.image, vc.width

    @torch.no_grad()
    def __call__(self, batch):
        # (B, T, 4, S, S): CLIP-normalised RGB + the letterbox mask
        frames = batch.get("teacher_videos")
        S, g = self.image_size, self.vit.vc.grid
        if (frames is None or frames.ndim != 5 or frames.shape[2] not in (3, 4)
                or tuple(frames.shape[-2:]) != (S, S)):
            found = "none" if frames is None else f"shape {tuple(frames.shape)}"
            raise ValueError(f"the ViT teacher reads batch['teacher_videos'], (B, T, 4, {S}, {S}) "
                             f"from a dataset made with teacher_size={S}; found {found}")
        check_pairing(batch["videos"], frames, self.cfg, self.vit.vc.patch)
        B, T = frames.shape[:2]
        x = frames[:, :, :3].flatten(0, 1).to(self.device, non_blocking=True)  # (B*T, 3, S, S)
        # its own dtype, whatever autocast the caller runs
        with torch.autocast(self.device.type, enabled=False):
            tokens = self.vit(x, len(self.vit.layers) - 1)  # hidden_states[-2]: (B*T, 1 + g*g, D)
        return tokens[:, 1:].reshape(B, T, g, g, -1)


def valid_patches(video, patch):
    """Which patch x patch squares are wholly inside the letterbox, in every frame: the release
    keeps a teacher token where avg_pool(mask, 14) == 1. video (B, T, 3 or 4, S, S), channel 3 the
    mask -> (B, S/patch, S/patch) bool; without a mask channel, every patch."""
    B, T, C, S, _ = video.shape
    if C == 3:
        return torch.ones(B, S // patch, S // patch, dtype=torch.bool, device=video.device)
    masks = video[:, :, 3].flatten(0, 1)[:, None].float()  # (B*T, 1, S, S)
    whole = F.avg_pool2d(masks, patch) == 1  # (B*T, 1, g, g); the sums of 0s and 1s are exact
    return whole.view(B, T, S // patch, S // patch).all(1)


def check_pairing(videos, teacher_videos, cfg, patch):
    """The teacher's valid patches must be the student's valid LSD cells: the teacher's frames are
    made from the same decoded frames (their letterbox box is exactly half the student's) and flip
    with them."""
    student = valid_patches(videos, cfg.patch_size * cfg.lsd_window)  # (B, g, g)
    teacher = valid_patches(teacher_videos, patch).to(student.device)
    differ = (student != teacher).flatten(1).any(1)
    if differ.any():
        b = int(differ.nonzero()[0, 0])
        raise ValueError(f"video {b} of the batch: the teacher's letterbox ({span(teacher[b])}) "
                         f"is not the student's ({span(student[b])}): make both from the same "
                         f"decoded frames, flipped together")


def span(valid):
    """Where a (g, g) valid mask is, in words: "rows 0-15, columns 3-11"."""
    rows, columns = valid.any(1).nonzero()[:, 0].tolist(), valid.any(0).nonzero()[:, 0].tolist()
    if not rows:
        return "no valid patch"
    return f"rows {rows[0]}-{rows[-1]}, columns {columns[0]}-{columns[-1]}"


def vit_teacher(path, cfg, device="cpu"):
    """A ViTTeacher from the checkpoint directory `path`: config.json and model.safetensors or
    pytorch_model.bin, sharded or not, of a CLIPVisionModel, CLIPVisionModelWithProjection or
    CLIPModel (OpenAI's CLIP ViT-L/14 and LanguageBind's image tower have this layout), strictly
    loaded on device."""
    if not path:
        raise ValueError("--distill=vit needs --teacher=DIR: a local Hugging Face CLIP vision "
                         "checkpoint (e.g. a ViT-L/14)")
    path = Path(path)
    vc = read_vit_config(path)
    # shapes only: every tensor is filled from the file, none initialised first
    with torch.device("meta"):
        vit = ViT(vc)
    vit = vit.to(teacher_dtype(device)).to_empty(device=device)
    load_vit_weights(vit, path)
    return ViTTeacher(vit, cfg)


# Hugging Face's CLIPVisionConfig field -> (ViTConfig field, the value transformers takes when
# config.json leaves the field out: CLIPVisionConfig's default, that of ViT-B/32).
HF_VISION_FIELDS = {"hidden_size": ("width", 768), "num_hidden_layers": ("layers", 12),
                    "num_attention_heads": ("heads", 12), "intermediate_size": ("mlp", 3072),
                    "patch_size": ("patch", 32), "image_size": ("image", 224),
                    "hidden_act": ("act", "quick_gelu"), "layer_norm_eps": ("eps", 1e-5)}


def read_vit_config(path):
    """The ViTConfig of a checkpoint directory: its config.json's vision_config (CLIPModel,
    LanguageBind) or, without one, the file's own fields (CLIPVisionModel)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: the teacher is a local Hugging Face "
                                f"CLIP checkpoint directory")
    try:
        hf = json.loads(file.read_text())
        hf = hf.get("vision_config", hf)
        return ViTConfig(**{ours: hf.get(theirs, default)
                            for theirs, (ours, default) in HF_VISION_FIELDS.items()})
    except (ValueError, TypeError, AttributeError) as err:  # not JSON or an object; a bad shape
        raise CheckpointError(f"{file}: not a CLIP vision config: {err}") from None


# a CLIPModel's other parts
CLIP_TEXT_SIDE = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def load_vit_weights(vit, path):
    """Fill a ViT from the checkpoint in the directory path, strictly. Hugging Face's names are ours
    under `vision_model.` (CLIPModel; CLIPVisionModel before transformers 5), `embeddings.` and
    `encoder.`. Temporal layers (LanguageBind's video tower) are refused: ViT runs every frame on
    its own."""
    from checkpoints import checkpoint_dirs  # safetensors: only a teacher from a file needs it

    def tensors():
        for file, key, tensor in checkpoint_dirs.read_tensors(checkpoint_dirs.weight_files(path)):
            name = key.removeprefix("vision_model.")
            # post_layernorm: not built (ViT's docstring); position_ids: a buffer older
            # transformers saved
            if (key.startswith(CLIP_TEXT_SIDE) or name.startswith("post_layernorm.")
                    or name.endswith("position_ids")):
                continue
            if ".temporal_" in name:
                raise CheckpointError(
                    f"{path / file}: {key!r} is temporal attention across frames, which "
                    f"LanguageBind's video tower adds to every layer (temporal_embedding, "
                    f"temporal_attn, temporal_layer_norm1) and this teacher does not model: use "
                    f"an image tower, e.g. OpenAI's CLIP ViT-L/14 or LanguageBind_Image")
            yield file, key, name.removeprefix("embeddings.").removeprefix("encoder."), tensor
    fill(vit.state_dict(), path, tensors(), "a CLIP vision tower")


def fill(tensors, path, stream, what):
    """Copy each (file, key, name, tensor) of stream into tensors[name] (a state_dict), strictly: a
    name not there or seen twice, a shape that differs, or a tensor left unfilled is a
    CheckpointError."""
    filled = set()
    for file, key, name, tensor in stream:
        where = Path(path) / file
        if name not in tensors or name in filled:
            problem = "duplicate" if name in filled else "unexpected"
            raise CheckpointError(f"{where}: {problem} key {key!r} for {what}")
        if tensor.shape != tensors[name].shape:
            raise CheckpointError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, {what} "
                                  f"expects {tuple(tensors[name].shape)}")
        tensors[name].copy_(tensor)  # a state_dict's tensors are detached views: copy_ casts, moves
        filled.add(name)
    missing = [name for name in tensors if name not in filled]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) of {what} are not in the "
                              f"checkpoint, e.g. {missing[:5]}")


# ---------------------------------------------------------------------------- the release's head

# The release's VideoCompressor sits under this prefix with DistillHead's names (norm_layer.j.0/1,
# input_layer, output_layer); it also holds a second reference to the teacher, teacher_layer.*.
RELEASE_HEAD = "model.video_tower_compressor."


def is_release(path):
    """Whether a checkpoint directory is a released Video-Panda one (config.json's model_type
    "videopanda")."""
    from checkpoints import checkpoint_dirs
    return checkpoint_dirs.read_config(Path(path))["model_type"] == "videopanda"


def load_release_head(head, release_dir):
    """Fill a DistillHead from a released Video-Panda checkpoint directory (jh-yi/Video-Panda-7B's
    videopanda_prtr1 or videopanda_fitu), strictly, to go on training from it. Its head was made
    for the release's decoder (32 layers: 9 taps) and teacher (width 1024): DistillHead(that cfg,
    1024)."""
    from checkpoints import checkpoint_dirs
    path = Path(release_dir)

    def tensors():
        for file, key, tensor in checkpoint_dirs.read_tensors(checkpoint_dirs.weight_files(path)):
            if key.startswith(RELEASE_HEAD) and not key.startswith(RELEASE_HEAD + "teacher_layer."):
                yield file, key, key.removeprefix(RELEASE_HEAD), tensor
    fill(head.state_dict(), path, tensors(), "the distillation head")
