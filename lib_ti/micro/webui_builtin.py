"""``bench quality --engine webui-builtin``: the same benchmark with the webui's OWN trainer running the loop.

The yardstick for "better than the built-in": the A1111 webui's Train tab trainer, driven through its
API (``/sdapi/v1/create/embedding``, ``/sdapi/v1/train/embedding``) at its own defaults (learning rate
0.005, ``subject.txt``, latent sampling "once", batch 1, one vector from the benchmark's init word),
saving a step embedding every ``eval_every`` steps. Those are rendered and scored exactly as ours are:
the same prompts and seeds through the host's txt2img (``WebuiTarget.render``) and the same classifier.

Host bugs of webui v1.10.1 and what the shared driver (``lib_ti.remote.builtin``) does about each are
listed there. Here, on top: a failure inside its loop is only logged, so the driver checks that every step
file it asked for exists and says which are missing; the host's own step-0 file, refused by its pickle
check, is registered as a PNG copy in ``<embeddings>/ti-bench-builtin/`` (emptied at the start), and
the saved step files as ``.safetensors`` copies there; it always saves every ``eval_every`` steps (the
host fails when both the save and the image intervals are 0).

The host names the checkpoint written after N-1 optimizer steps ``<name>-N`` (``steps_done =
embedding.step + 1``); rows keep the host's names. Only HTTP and files are used: nothing of the
webui is imported, so the driver must run on the machine of the webui (it reads the step files).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import TIError
from ..remote import builtin
from .quality import Trained
from .webui_target import WebuiTarget

SCRATCH = "ti-bench-builtin"  # sub-folder of the webui's embeddings folder for the converted step files


def builtin_settings(cfg, name: str, data_dir: Path, log_dir: Path) -> dict:
    """The host's ``train_embedding`` arguments: the Train tab's defaults, the benchmark's data, size, steps and
    save interval, no previews."""
    return builtin.train_body(name=name, data_dir=str(data_dir), log_dir=str(log_dir), steps=cfg.steps, width=64,
                              height=64, save_every=cfg.eval_every, task_id="bench-quality")


class WebuiBuiltinTarget(WebuiTarget):
    name = "webui-builtin"

    def token(self, cfg) -> str:
        # not ours (my-<concept>): both trainers' checkpoints can live in the same webui side by side
        return f"builtin-{cfg.concept}"

    def train(self, cfg, data_dir: Path):
        if cfg.steps % cfg.eval_every:
            raise TIError(f"bench quality --engine webui-builtin: --steps {cfg.steps} must be a multiple of "
                          f"--eval-every {cfg.eval_every} (the host saves only every N steps: the last step would "
                          "have no file)")
        name = self.token(cfg)
        # the benchmark's own scratch folder is emptied: last run's checkpoints
        scratch = builtin.create_registered(self.client, name, vectors=1, init_text=cfg.init_text, scratch=SCRATCH,
                                            clear_scratch=True, progress=self.progress)
        log_dir = (Path(cfg.out) / "builtin-log").resolve()
        shutil.rmtree(log_dir, ignore_errors=True)
        settings = builtin_settings(cfg, name, data_dir.resolve(), log_dir)
        self.progress(f"training {name!r} with the webui's built-in trainer, {cfg.steps} steps (the call blocks)")
        answer = builtin.train(self.client, settings)
        steps = cfg.eval_steps
        files = builtin.step_files(log_dir, name)
        missing = [s for s in steps if s not in files]
        if missing:
            raise TIError(f"the webui's built-in trainer saved no checkpoint for step(s) {missing} (saved: "
                          f"{sorted(files) or 'none'}) although its API answered {answer!r}: it reports a failure "
                          "inside its loop only in its console ('Error training embedding'); look there")
        for step in steps:
            builtin.convert(files[step], scratch / f"{name}-{step}.safetensors")
        builtin.refresh(self.client, [f"{name}-{s}" for s in steps])
        return Trained(max(steps), builtin.final_file(answer)), settings
