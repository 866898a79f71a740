"""Data for panda: synthetic video QA, real video files, QA datasets, tokenizers and prompts.

Everything that turns files or random seeds into the tensors VideoPanda.forward() takes:
videos (B, T, C, H, W) float32 (C = 3, or 4 with the letterbox mask as channel 3),
input_ids (B, S) int64 right-padded, with VIDEO_PLACEHOLDER (-200) once per row where the
video goes, labels (B, S) int64 with IGNORE_INDEX (-100) on every non-answer token, and
lengths (B,) the number of real (non-padding) tokens of each row.
"""

VIDEO_PLACEHOLDER = -200  # same sentinel as the release's IMAGE_TOKEN_INDEX; panda.py defines it too
IGNORE_INDEX = -100       # label of tokens that carry no loss (F.cross_entropy's default ignore_index)

# ---------------------------------------------------------------------------------------------
# Section 1: synthetic video QA (owned by the synthetic-data work)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Section 2: real video files, geometry, QA datasets (owned by the real-video work)
# ---------------------------------------------------------------------------------------------
