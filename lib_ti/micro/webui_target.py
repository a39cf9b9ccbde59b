"""``bench quality --engine webui``: the same benchmark with the loop run by a webui that has this extension.

The webui must be running with ``--api`` and have the micro model loaded (``micro-sd.safetensors``
and its ``.yaml`` in its checkpoint folder). Training goes through ``POST /ti-trainer/v1/train``,
so the webui adapter (the host's own text encoder, sampler-free loss, checkpoint publishing) runs
it; renders go through the host's own ``/sdapi/v1/txt2img`` (Euler), naming each published
checkpoint (``my-triangle-100``) in the prompt, as a user would. Only HTTP is used here: nothing of
the webui is imported.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

from ..errors import TIError
from ..remote.client import WebuiClient
from .evaluate import Case
from .model import NAME
from .quality import Trained, train_config

POLL_S = 1.0


class WebuiTarget:
    name = "webui"

    def __init__(self, url: str, auth: str | None = None, *, timeout_s: float = 3600,
                 progress=lambda _msg: None) -> None:
        self.client, self.timeout_s, self.progress = WebuiClient(url, auth), timeout_s, progress
        self.model = self._loaded_checkpoint()

    def _loaded_checkpoint(self) -> str:
        loaded = str(self.client.call("GET", "/sdapi/v1/options").get("sd_model_checkpoint") or "")
        if not loaded.startswith(NAME):
            raise TIError(f"the webui has {loaded or 'no checkpoint'!r} loaded; the benchmark needs the micro model: "
                          f"copy lib_ti/assets/micro-sd/{NAME}.safetensors and {NAME}.yaml into its models/"
                          "Stable-diffusion folder and select it")
        return loaded

    # ------------------------------------------------------------------ the target
    def token(self, cfg) -> str:
        """The embedding's name in the webui (its checkpoints are ``<token>-<step>``)."""
        return cfg.token

    def train(self, cfg, data_dir: Path):
        # A relative output folder: the webui keeps runs under its own output root, and refuses others.
        tcfg = train_config(cfg, "", data_dir.resolve(), f"bench-quality-{cfg.concept}")
        body = {k: v for k, v in tcfg.to_dict().items() if k != "model"}
        job = self.client.call("POST", "/ti-trainer/v1/train", body)
        deadline, last = time.monotonic() + self.timeout_s, -1
        while job["state"] in ("queued", "running", "stopping"):
            if time.monotonic() > deadline:
                self.client.call("POST", "/ti-trainer/v1/stop")
                raise TIError(f"the webui run {job['run_id']} did not finish within {self.timeout_s:.0f}s; stopped it")
            time.sleep(POLL_S)
            job = self.client.call("GET", f"/ti-trainer/v1/status?run_id={job['run_id']}")
            if job["step"] != last and job["step"] and job["step"] % max(1, cfg.eval_every) == 0:
                self.progress(f"webui run {job['run_id']}: step {job['step']}/{job['total_steps']}, loss {job['loss']}")
            last = job["step"]
        if job["state"] != "finished":
            raise TIError(f"the webui run ended {job['state']}: {job.get('error') or job.get('result')}")
        return Trained(job["step"], job["final_path"] or ""), tcfg

    def render(self, cfg, cases: list[Case], step: int | None) -> list:
        """Through the host's txt2img: step 0 names the init word, a step names its published checkpoint
        (``<token>-<step>``), None means the cases already name the shape."""
        checkpoint = f"{self.token(cfg)}-{step}" if step else None
        word = cfg.init_text if step == 0 else checkpoint
        images = []
        for case in cases:
            prompt = case.prompt.replace(cfg.token, word) if word else case.prompt
            image, infotext = self._txt2img(prompt, case.seed, cfg)
            if checkpoint and f"{checkpoint}: " not in infotext:
                raise TIError(f"the webui rendered {prompt!r} without the embedding {checkpoint!r} (its infotext lists "
                              "no such TI hash): was the checkpoint published to its embeddings folder?")
            images.append(image)
        return images

    def _txt2img(self, prompt: str, seed: int, cfg):
        from PIL import Image

        answer = self.client.call("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": seed, "steps": cfg.sampler_steps,
            "cfg_scale": cfg.cfg_scale, "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 1,
            "n_iter": 1, "send_images": True, "save_images": False,
        })
        infotexts = json.loads(answer.get("info") or "{}").get("infotexts") or [""]
        return Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"), infotexts[0]
