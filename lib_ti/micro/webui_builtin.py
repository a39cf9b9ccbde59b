"""``bench quality --engine webui-builtin``: the same benchmark with the webui's OWN trainer running the loop.

The yardstick for "better than the built-in": the A1111 webui's Train tab trainer, driven through its
API (``/sdapi/v1/create/embedding``, ``/sdapi/v1/train/embedding``) at its own defaults (learning rate
0.005, ``subject.txt``, latent sampling "once", batch 1, one vector from the benchmark's init word),
saving a step embedding every ``eval_every`` steps. Those are rendered and scored exactly as ours are:
the same prompts and seeds through the host's txt2img (``WebuiTarget.render``) and the same classifier.

Host bugs of webui v1.10.1 this driver meets, and what it does about each (it never patches the host):

* its API answers 200 whatever happens, with the error (if any) inside the text, and a failure inside
  the training loop is only logged ("Error training embedding"): the driver reads the answer's text
  and checks that every step file it asked for exists, and says which are missing;
* its pickle check refuses ``.pt`` files written by a recent torch (the zip entries
  ``.format_version``/``.storage_alignment`` are not on its list), including the step-0 file its own
  *Create embedding* just wrote, which then never registers: the driver converts that file to a PNG
  embedding (the host's own text-chunk format) and the saved step files to ``.safetensors``, in a
  scratch sub-folder of the embeddings folder (``ti-bench-builtin/``, emptied at the start), and
  registers them with the host's *refresh embeddings*;
* an embedding loaded from ``.safetensors`` has no step (None), and the host's trainer then fails at
  its first step (its learning-rate schedule compares None < int; the API still says "error: None"):
  hence a PNG embedding, which carries step 0, for the one it trains;
* it fails (missing log folder) when both the save and image intervals are 0: the driver always
  saves every ``eval_every`` steps;
* its dataset sampler (``GroupedBatchSampler``) passes ``data_source`` to ``Sampler.__init__``, which
  recent torch no longer accepts: training cannot start; the driver recognises the error and names
  the host fix (``super().__init__()`` in ``modules/textual_inversion/dataset.py``).

The host names the checkpoint written after N-1 optimizer steps ``<name>-N`` (``steps_done =
embedding.step + 1``); rows keep the host's names. Only HTTP and files are used: nothing of the
webui is imported, so the driver must run on the machine of the webui (it reads the step files).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import TIError
from ..formats.embeddings import load_embedding, save_embedding
from .quality import Trained
from .webui_target import WebuiTarget

SCRATCH = "ti-bench-builtin"  # sub-folder of the webui's embeddings folder for the converted step files
TRAIN_TIMEOUT_S = 6 * 3600  # the host's train call blocks until the run ends
SAMPLER_BUG = ("the webui's built-in trainer cannot start on this torch: its dataset sampler "
               "(GroupedBatchSampler in modules/textual_inversion/dataset.py) calls Sampler.__init__(data_source), "
               "which recent torch (e.g. 2.14) refuses. Host fix: `super().__init__()` there (or run "
               "the webui on the torch it pins, 2.1.2)")


def builtin_settings(cfg, name: str, data_dir: Path, log_dir: Path) -> dict:
    """The 30 arguments of the host's ``train_embedding`` (all required by its API): the Train tab's defaults,
    the benchmark's data, size, steps and save interval, no previews."""
    return {
        "id_task": "bench-quality", "embedding_name": name, "learn_rate": "0.005", "batch_size": 1,
        "gradient_step": 1, "data_root": str(data_dir), "log_directory": str(log_dir), "training_width": 64,
        "training_height": 64, "varsize": False, "steps": cfg.steps, "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
        "use_weight": False, "create_image_every": 0, "save_embedding_every": cfg.eval_every,
        "template_filename": "subject.txt", "save_image_with_stored_embedding": False,
        "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 20,
        "preview_sampler_name": "Euler a", "preview_cfg_scale": 7.0, "preview_seed": -1.0, "preview_width": 64,
        "preview_height": 64,
    }


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
        created = self._create(name, cfg.init_text)
        scratch = created.parent / SCRATCH
        shutil.rmtree(scratch, ignore_errors=True)  # the benchmark's own folder: last run's checkpoints
        self._register_step0(name, created, scratch)
        log_dir = (Path(cfg.out) / "builtin-log").resolve()
        shutil.rmtree(log_dir, ignore_errors=True)
        settings = builtin_settings(cfg, name, data_dir.resolve(), log_dir)
        self.progress(f"training {name!r} with the webui's built-in trainer, {cfg.steps} steps (the call blocks)")
        answer = str(self._call("POST", "/sdapi/v1/train/embedding", settings, timeout=TRAIN_TIMEOUT_S).get("info"))
        check_answer(answer)
        steps = cfg.eval_steps
        files = step_files(log_dir, name)
        missing = [s for s in steps if s not in files]
        if missing:
            raise TIError(f"the webui's built-in trainer saved no checkpoint for step(s) {missing} (saved: "
                          f"{sorted(files) or 'none'}) although its API answered {answer!r}: it reports a failure "
                          "inside its loop only in its console ('Error training embedding'); look there")
        for step in steps:
            convert(files[step], scratch / f"{name}-{step}.safetensors")
        self._refresh([f"{name}-{s}" for s in steps])
        final = answer.partition("filename: ")[2].partition(" error:")[0]
        return Trained(max(steps), final), settings

    def _create(self, name: str, init_text: str) -> Path:
        answer = str(self._call("POST", "/sdapi/v1/create/embedding", {
            "name": name, "num_vectors_per_token": 1, "overwrite_old": True, "init_text": init_text}).get("info"))
        found = re.fullmatch(r"create embedding filename: (.+)", answer.strip())
        if not found:
            raise TIError(f"the webui's Create embedding failed: {answer!r}")
        return Path(found.group(1))

    def _register_step0(self, name: str, created: Path, scratch: Path) -> None:
        """The host's own step-0 file, or (its pickle check refused it) a .safetensors copy of it. Reloaded by
        force: *Create embedding* reloads only when the folder's mtime changed, which overwriting a file does
        not do, and a trained embedding left in memory would make the host skip training ("already trained")."""
        self._call("POST", "/sdapi/v1/refresh-embeddings")
        if name in self._loaded():
            return
        # A PNG embedding (the host's own format, a text chunk): it carries the step, which a .safetensors file
        # cannot, and the host's trainer fails on an embedding without one (its schedule compares None < int).
        self.progress(f"the webui did not load its own {created.name} (its pickle check refuses .pt files of a "
                      f"recent torch): registering a PNG-embedding copy in {scratch}")
        convert(created, scratch / f"{name}.png")
        self._refresh([name])

    def _refresh(self, names: list[str]) -> None:
        self._call("POST", "/sdapi/v1/refresh-embeddings")
        absent = [n for n in names if n not in self._loaded()]
        if absent:
            raise TIError(f"the webui did not register the embedding(s) {absent} after refresh-embeddings; is the "
                          "embeddings folder it reports the one it loads (--embeddings-dir)?")

    def _loaded(self) -> set[str]:
        return set(self._call("GET", "/sdapi/v1/embeddings").get("loaded") or {})


def check_answer(answer: str) -> None:
    """The host answers 200 to everything: its text says whether training ran (a failure inside its loop is
    not in it: the step files tell)."""
    if answer.startswith("train embedding complete:") and answer.endswith("error: None"):
        return
    if "takes exactly one argument" in answer or "Sampler" in answer:
        raise TIError(f"{SAMPLER_BUG}. Its API answered: {answer!r}")
    raise TIError(f"the webui's built-in trainer failed: {answer!r}")


def step_files(log_dir: Path, name: str) -> dict[int, Path]:
    """The host's step embeddings, ``<log>/<date>/<name>/embeddings/<name>-<N>.pt`` (a run may cross midnight)."""
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.pt")
    return {int(m.group(1)): path for path in sorted(log_dir.glob(f"*/{name}/embeddings/*.pt"))
            if (m := pattern.fullmatch(path.name))}


def convert(source: Path, target: Path) -> Path:
    """A host ``.pt`` embedding as ``target`` (``.safetensors`` or ``.png``, by its suffix; the host loads those
    whatever torch wrote them), named by its stem."""
    emb = load_embedding(source, name=target.stem)
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_embedding(emb, target, overwrite=True)
