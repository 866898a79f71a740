"""Real videos as a training run's data (train.py --data): RealVideos, the batches of a
Video-ChatGPT / Valley instruction file and where a run is in them. The synthetic task's
counterpart, with the same attributes and methods, is data.SyntheticTask. train.py imports this
only for --data: the synthetic run needs neither PyAV nor Pillow."""

from multi_gpu import distributed
from real_video import video_files


class RealVideos:
    """A Video-ChatGPT / Valley instruction file (--data) and its videos (video_files), epochs in a
    seeded order, process r taking every world-th sample. Where the run is, epoch_position, is each
    process's own place in its share: a run goes on on as many processes as it was saved from.
    Nothing is scored during the run; its end lists what was skipped."""
    template = "vicuna_v1"  # the prompt format of the release's instruction files
    decodes_files = True    # waits for its batches are decoding: more --num_workers shorten them

    def __init__(self):
        self.epoch_position = (0, 0)  # (epoch, the samples of it this process has taken)
        self.skipped = []  # on_error=skip's messages (resumed, rank 0 holds the earlier ones)

    data_place = property(lambda self: self.epoch_position)  # the checkpoint's data_place

    def start_stream(self, run, ckpt):
        """The batches from the first epoch's start, or from where ckpt left this process."""
        config = run.config
        if ckpt is not None:
            places = ckpt["data_place"]
            if len(places) != run.world:
                raise ValueError(f"a run on --data resumes on as many processes as it was saved "
                                 f"from ({len(places)}): each one's share of the samples depends "
                                 "on their number")
            self.epoch_position = tuple(places[run.rank])
        self.dataset = video_files.VideoInstructionDataset(
            config.data, config.video_folder or ".", run.tokenizer, run.model.cfg, train=True,
            on_error=config.on_error, decode_threads=1, frame_cache=config.frame_cache,
            teacher_size=run.teacher.image_size if config.distill == "vit" else 0)
        self.data_size = len(self.dataset)  # saved: a resume checks the file still has as many
        if self.data_size < run.world:
            raise ValueError(f"{config.data} has {self.data_size} usable entries, fewer than the "
                             f"{run.world} processes")
        if ckpt is not None and ckpt["data_size"] != self.data_size:
            raise ValueError(f"{config.data} has {self.data_size} usable entries, the checkpoint's "
                             f"file had {ckpt['data_size']}: its epoch and position would point at "
                             "other samples")
        plan = video_files.BatchPlan(config.batch_size, config.seed, run.rank, run.world,
                                     config.num_workers)
        self.stream = video_files.batches(self.dataset, plan, self.epoch_position, config.on_error,
                                          self.skipped)

    def next_batch(self):
        batch, self.epoch_position = next(self.stream)
        return batch

    def evaluate_mid_run(self, run, write):  # an instruction file has no answers to score here
        pass

    def finish(self, run, check_stop):
        """What on_error=skip skipped, on all processes, listed by rank 0. (check_stop goes unused:
        nothing here takes long.)"""
        skipped = [message for part in distributed.gather(self.skipped) for message in part]
        if run.master:
            video_files.report_skipped(skipped, self.dataset)
