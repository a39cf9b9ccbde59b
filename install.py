"""Run by the webui (with its own Python) when the extension is installed and on every launch.

Installs only what is missing, and never torch: the webui's torch build must stay as it is.
"""

import importlib.util

import launch  # provided by the webui (PYTHONPATH=<webui root>)

# module name -> pip requirement. The webui already ships all of these; this only repairs broken installs.
NEEDED = {"safetensors": "safetensors", "yaml": "pyyaml", "PIL": "pillow", "tqdm": "tqdm"}

for module, requirement in NEEDED.items():
    if importlib.util.find_spec(module) is None:
        launch.run_pip(f"install {requirement}", f"{requirement} for sd-webui-ti-trainer")
