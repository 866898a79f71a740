"""Feature distillation (the paper's Eq. 18-19): teachers.py holds the head, the loss, the synthetic
task's oracle teacher and a frozen CLIP ViT teacher; teacher_bench.py times the ViT teacher."""
