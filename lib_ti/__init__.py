"""sd-webui-ti-trainer core: Textual Inversion training for SD1.x, SD2.x and SDXL.

Importable without any webui; heavy dependencies (diffusers, transformers) load lazily.
"""

__version__ = "0.1.0"
