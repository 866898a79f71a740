"""For a class: exercises.py (docs/EXERCISES.md), attention_pictures.py (sample.py --viz: what
LSD, FSRA and GSTRA attend to), ablate.py (the paper's Table 4 on the tiny task)."""
