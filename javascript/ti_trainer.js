// sd-webui-ti-trainer: client-side helpers for the Train Embedding tab (progress polling arrives with the tab's controls).
