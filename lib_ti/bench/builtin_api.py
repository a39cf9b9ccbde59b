"""A running webui, over HTTP only: a small client, and the webui's own (built-in) Textual Inversion
trainer driven through its API, for benchmarks that compare with it. Nothing of the webui is imported
and the host is never patched; its known failures are recognised and reported as what they are:

* its train API answers 200 whatever happens, with the error (if any) inside the text;
* it fails when both the save and the image intervals are 0 (``train_body`` saves once, after the end);
* its dataset sampler (``GroupedBatchSampler``) passes ``data_source`` to ``Sampler.__init__``, which
  recent torch refuses: training cannot start (``SAMPLER_BUG`` names the host fix).
* its pickle check refuses the ``.pt`` files a recent torch writes, its own *Create embedding*'s too, which
  then never registers (``bench.webui_speed.register_created`` registers a legacy-format copy); a
  ``.safetensors`` copy is no way round, since the host reads no step from those and its trainer fails
  on step None (``learn_schedule``: '<' not supported between 'NoneType' and 'int');
* a failure inside its loop is only in its console ("Error training embedding"), not in the answer.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from typing import Any

from ..errors import TIError

SAMPLER_BUG = ("the webui's built-in trainer cannot start on this torch: its dataset sampler "
               "(GroupedBatchSampler in modules/textual_inversion/dataset.py) calls Sampler.__init__(data_source), "
               "which recent torch refuses. Host fix: `super().__init__()` there (or run the webui on the torch it "
               "pins, 2.1.2)")


class WebuiClient:
    """JSON over HTTP to a webui started with ``--api`` (and ``--api-auth`` when ``auth`` is given)."""

    def __init__(self, url: str, auth: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if auth:
            if ":" not in auth:
                raise TIError(f"--webui-auth {auth!r} must be user:password (as in the webui's --api-auth)")
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode("ascii")

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float = 600) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            hint = " (start the webui with --api and, if it uses --api-auth, pass --webui-auth)" \
                if exc.code in (401, 404) else ""
            raise TIError(f"the webui at {self.url} answered {exc.code} to {method} {path}: {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TIError(f"cannot reach the webui at {self.url} ({exc}); start it with --api, or fix --webui-url") \
                from None


def create_embedding(client: WebuiClient, name: str, vectors: int, init_text: str) -> str:
    """The built-in's *Create embedding*; returns the file it wrote."""
    answer = str(client.call("POST", "/sdapi/v1/create/embedding", {
        "name": name, "num_vectors_per_token": vectors, "overwrite_old": True, "init_text": init_text}).get("info"))
    found = re.fullmatch(r"create embedding filename: (.+)", answer.strip())
    if not found:
        raise TIError(f"the webui's built-in Create embedding failed: {answer!r}")
    return found.group(1)


def train_body(*, name: str, data_dir: str, log_dir: str, steps: int, width: int, height: int,
               learning_rate: str = "0.005", batch_size: int = 1, template: str = "subject.txt",
               latent_sampling: str = "once", save_every: int = 0, task_id: str = "ti-bench") -> dict:
    """The 30 arguments of the host's ``train_embedding`` (its API requires all): no previews; a save
    interval of 0 becomes ``steps`` (one save at the end), because the host fails when both are 0."""
    return {
        "id_task": task_id, "embedding_name": name, "learn_rate": learning_rate, "batch_size": batch_size,
        "gradient_step": 1, "data_root": data_dir, "log_directory": log_dir, "training_width": width,
        "training_height": height, "varsize": False, "steps": steps, "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": latent_sampling,
        "use_weight": False, "create_image_every": 0, "save_embedding_every": save_every or steps,
        "template_filename": template, "save_image_with_stored_embedding": False, "preview_from_txt2img": False,
        "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 20, "preview_sampler_name": "Euler a",
        "preview_cfg_scale": 7.0, "preview_seed": -1.0, "preview_width": width, "preview_height": height,
    }


def train(client: WebuiClient, body: dict, *, timeout: float = 6 * 3600) -> str:
    """Run the built-in trainer (the call blocks until its run ends); returns the final file, or raises with
    the reason: the host answers 200 to everything, so its text is what says whether training ran."""
    answer = str(client.call("POST", "/sdapi/v1/train/embedding", body, timeout=timeout).get("info"))
    check_train_answer(answer)
    return answer.partition("filename: ")[2].partition(" error:")[0]


def check_train_answer(answer: str) -> None:
    if answer.startswith("train embedding complete:") and answer.endswith("error: None"):
        return
    if "takes exactly one argument" in answer or "Sampler" in answer:
        raise TIError(f"{SAMPLER_BUG}. Its API answered (status 200): {answer!r}")
    raise TIError(f"the webui's built-in trainer failed (its API answered 200 with): {answer!r}")
