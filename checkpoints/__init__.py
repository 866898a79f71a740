"""Checkpoints on disk. run_files.py: a training run's own out_dir (ckpt.pt, resuming, the run lock);
checkpoint_dirs.py: model directories in and out (Hugging Face LLMs, the release's layout, our
exports); export.py and random_export.py: the command lines that write them."""
