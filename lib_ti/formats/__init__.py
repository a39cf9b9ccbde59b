"""File formats: embedding files (every format the webuis and trainers use), CLIP tokenizer files,
and a diffusers pipeline written as a diffusers folder or as a webui single-file checkpoint."""
