"""Dataset tools: prepare images into a training folder, caption them with BLIP, and check a
training config against its images before any model loads (the pre-flight check)."""
