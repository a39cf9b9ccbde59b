"""What checkpoint scoring uses unless told otherwise; no torch here, so the command line's --help stays fast."""

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the CLIP the Textual Inversion paper's scores used (ViT-B/32)

# New contexts for an object, of the kind the paper's editability prompts are; --prompt replaces them.
EDIT_PROMPTS = (
    "a photo of a [name] on the beach",
    "a photo of a [name] in the snow",
    "an oil painting of a [name]",
    "a [name] in a forest",
    "a pencil sketch of a [name]",
    "a [name] on a wooden table",
)
