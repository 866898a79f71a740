"""Real video files, for training on and asking about real clips (the synthetic task needs none of
this): video_files.py reads, samples and letterboxes frames and reads the instruction and QA files;
letterbox_tokens.py is what the STAB does with a letterboxed frame's mask channel (torch only);
training_data.py makes them train.py's data (--data); loader_bench.py times the loading."""
