"""File formats: embedding files (every format the webuis and trainers use), CLIP tokenizer files,
and a diffusers pipeline written as a diffusers folder or as a webui single-file checkpoint."""

# The embedding file formats by name; here, not in embeddings.py, so the command line lists them
# without importing torch.
EMBEDDING_FORMATS = ("safetensors", "pt", "png", "webp", "diffusers")
