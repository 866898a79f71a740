"""Loader throughput: how many videos a second the training DataLoader delivers from a folder of
clips with a given number of worker processes, so that --num_workers can be sized against a GPU's
step rate.

    python real_video/loader_bench.py --folder=../shared/data/videos --workers=4
    python real_video/loader_bench.py --write_clip=out/bench/streaming.mp4
    python real_video/loader_bench.py --folder=out/bench --workers=0 --against_front_to_back=true

Every load is one clip of the folder (cycling through them) read as train.py reads it: the
instruction dataset (read_video with one decoding thread, letterboxed to the model's frames, the
training flip) through video_files.batches (its DataLoader settings). Each worker's first batch
(process start-up) is not timed. A GPU step of B videos every s seconds needs B / s videos a
second.

--against_front_to_back=true first times, for every clip, read_video against a front-to-back
decode of the same frames (best of --repeats, one thread, in this process) and checks that the
frames are identical. --frame_cache=DIR loads through a FrameCache in DIR: a first run fills it, a
second reads it. --write_clip=PATH writes the clip docs/video.md measures and stops: 90 s of
1280x720 H.264 at 30 fps, a keyframe every 2 s and B-frames, as streaming sites encode.
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import av
import numpy as np

# the repository root, wherever this runs from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402
import data  # noqa: E402
from real_video import video_files  # noqa: E402
from panda import PandaConfig  # noqa: E402


@dataclass
class LoaderBenchConfig:
    folder: str = ""                     # the clips to load (required unless --write_clip)
    workers: int = 2                     # DataLoader workers (train.py's --num_workers); 0: none
    videos: int = 64                     # videos to load after the workers' first batches
    batch_size: int = 4                  # videos per batch (train.py's --batch_size)
    teacher_size: int = 0                # also letterbox a copy for a teacher (the release's: 224)
    frame_cache: str = ""                # read and fill a frame cache in this folder
    preset: str = "paper"                # the model whose frames are made (n_frames, image_size)
    against_front_to_back: bool = False  # first time read_video against a front-to-back decode
    repeats: int = 3                     # --against_front_to_back: best of this many runs each
    write_clip: str = ""                 # write the 90-s 720p test clip to this path, then stop


def write_streaming_clip(path, seconds=90, fps=30, width=1280, height=720):
    """A deterministic synthetic clip encoded as streaming sites do: H.264, yuv420p, a keyframe
    every 2 s (none extra at scene cuts), 3 B-frames, about 3.4 Mbit/s. A fine random texture
    slides under a moving square, so every frame has detail and motion to predict."""
    blocks = (height // 4, width // 4, 3)
    texture = np.random.default_rng(0).integers(0, 256, blocks, dtype=np.uint8)
    texture = texture.repeat(4, 0).repeat(4, 1)  # (H, W, 3), 4x4 px blocks
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "preset": "veryfast", "crf": "23", "g": str(2 * fps), "keyint_min": str(2 * fps),
            "sc_threshold": "0", "bf": "3"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            picture = np.roll(texture, 3 * i, axis=1)  # (H, W, 3) uint8, a copy
            x, y = (7 * i) % (width - 120), int((height - 120) / 2 * (1 + np.sin(i / 20)))
            picture[y:y + 120, x:x + 120] = (255 * (i // fps % 2), 200, 50)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    megabits_a_second = 8 * Path(path).stat().st_size / seconds / 1e6
    print(f"{path}: {seconds} s, {seconds * fps} frames of {width}x{height}, "
          f"{megabits_a_second:.2f} Mbit/s")


def best_time(run, repeats):
    """(the smallest wall time of `repeats` calls of run(), the last call's result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def compare_with_front_to_back(clips, n_frames, repeats):
    """Per clip: read_video's time against a front-to-back decode of the frames it sampled, both on
    one thread, and whether the frames are identical."""
    print(f"{'clip':<32} {'frames':>7} {'decoding':<40} {'read_video':>11} {'front to back':>14} "
          f"{'speed-up':>9}  identical")
    for clip in clips:
        seconds, (frames, info) = best_time(
            lambda: video_files.read_video(clip, n_frames, threads=1), repeats)
        reference_seconds, (reference, _, _) = best_time(
            lambda: video_files.decode_in_order(clip, info["indices"], threads=1), repeats)
        identical = np.array_equal(frames, np.stack([reference[n] for n in info["indices"]]))
        print(f"{clip.name:<32} {info['n_total']:>7} {info['decoding'][:40]:<40} {seconds:>10.3f}s "
              f"{reference_seconds:>13.3f}s {reference_seconds / seconds:>8.1f}x  "
              f"{'yes' if identical else 'NO'}")


def loader_throughput(clips, cfg, options):
    """Videos a second through video_files.batches over the clips, after each worker's first
    batch."""
    folder = clips[0].parent
    warmup = max(1, options.workers)  # batches: every worker's first one holds its start-up
    n_loads = warmup * options.batch_size + options.videos
    conversation = [{"from": "human", "value": "<video>\nDescribe the video."},
                    {"from": "gpt", "value": "A video."}]
    entries = [{"id": f"load-{k}", "video": clips[k % len(clips)].name,
                "conversations": conversation} for k in range(n_loads)]
    with tempfile.TemporaryDirectory() as scratch:
        annotation = Path(scratch) / "loads.json"
        annotation.write_text(json.dumps(entries))
        dataset = video_files.VideoInstructionDataset(
            annotation, folder, data.build_tokenizer(), cfg, train=True, on_error="skip",
            decode_threads=1, teacher_size=options.teacher_size, frame_cache=options.frame_cache)
        skipped = []
        plan = video_files.BatchPlan(options.batch_size, seed=0, num_workers=options.workers)
        stream = video_files.batches(dataset, plan, (0, 0), "skip", skipped)
        start = n_timed = 0
        for k, (batch, _) in enumerate(islice(stream, n_loads // options.batch_size)):
            if k == warmup - 1:
                start = time.perf_counter()
            elif k >= warmup:
                n_timed += len(batch["lengths"])
        seconds = time.perf_counter() - start
        stream.close()  # ends the DataLoader and its workers
    rate = n_timed / seconds
    per_worker = f", {rate / options.workers:.2f} per worker" if options.workers else ""
    teacher = f" + teacher {options.teacher_size} px" if options.teacher_size else ""
    cache = f", frame cache {options.frame_cache}" if options.frame_cache else ""
    print(f"{options.workers} worker(s), batches of {options.batch_size}, {cfg.n_frames} frames of "
          f"{cfg.image_size} px{teacher}{cache}: {n_timed} videos in {seconds:.1f} s, "
          f"{rate:.2f} videos/s{per_worker}" + (f" ({len(skipped)} skipped)" if skipped else ""))


def main(argv):
    """The command line: --write_clip, else --against_front_to_back (if asked) and the
    throughput."""
    bench_changes, cfg_changes = cli.parse_args(argv, __doc__, LoaderBenchConfig, PandaConfig)
    options = LoaderBenchConfig(**bench_changes)
    if options.write_clip:
        write_streaming_clip(options.write_clip)
        return
    folder = Path(options.folder)
    clips = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in video_files.VIDEO_EXTENSIONS) if folder.is_dir() else []
    if not clips:
        raise ValueError(f"--folder={options.folder!r}: expected a folder with video files "
                         f"({', '.join(video_files.VIDEO_EXTENSIONS)}), found none")
    if options.workers < 0 or options.videos < 1 or options.batch_size < 1 or options.repeats < 1:
        raise ValueError("--workers must be >= 0, and --videos, --batch_size and --repeats >= 1")
    cfg = PandaConfig.preset(options.preset, **cfg_changes)
    if options.against_front_to_back:
        compare_with_front_to_back(clips, cfg.n_frames, options.repeats)
    loader_throughput(clips, cfg, options)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
