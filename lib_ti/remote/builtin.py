"""The webui's own (built-in) Textual Inversion trainer, driven through its API for the benchmarks that
compare with it (``bench quality --engine webui-builtin``, ``bench speed --engine webui --vs builtin``).
The host is never patched; its known failures (webui v1.10.1) are recognised and reported as what they are:

* its API answers 200 whatever happens, with the error (if any) inside the text (``check_train_answer``),
  and a failure inside its loop is only in its console ("Error training embedding"), not in the answer:
  callers check what the run left (step files, steps seen);
* it fails (missing log folder) when both the save and the image intervals are 0: ``train_body`` saves
  at least once, after the end;
* its dataset sampler (``GroupedBatchSampler``) passes ``data_source`` to ``Sampler.__init__``, which
  recent torch refuses: training cannot start (``SAMPLER_BUG`` names the host fix);
* its pickle check refuses the ``.pt`` files a recent torch writes (the zip entries ``.format_version``/
  ``.storage_alignment`` are not on its list), its own *Create embedding*'s too, which then never
  registers: ``create_registered`` registers a PNG-embedding copy (the host's own text-chunk format) in a
  scratch sub-folder of its embeddings folder. Not a ``.safetensors`` copy: the host reads no step from
  those, and its trainer then fails at its first step (its schedule compares None < int, and the API
  still says "error: None"). Its saved step files, only rendered, may be ``.safetensors`` (``convert``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import TIError
from ..formats.embeddings import load_embedding, save_embedding
from .client import WebuiClient

TRAIN_TIMEOUT_S = 6 * 3600  # the host's train call blocks until the run ends
SAMPLER_BUG = ("the webui's built-in trainer cannot start on this torch: its dataset sampler "
               "(GroupedBatchSampler in modules/textual_inversion/dataset.py) calls Sampler.__init__(data_source), "
               "which recent torch (e.g. 2.14) refuses. Host fix: `super().__init__()` there (or run "
               "the webui on the torch it pins, 2.1.2)")


def create_registered(client: WebuiClient, name: str, *, vectors: int, init_text: str, scratch: str,
                      clear_scratch: bool = False, progress: Callable[[str], None] = lambda _m: None) -> Path:
    """The built-in's *Create embedding*, then the new embedding registered (the host's own file, or, its pickle
    check refused that, a PNG copy in ``<embeddings>/<scratch>/``); returns that scratch folder.
    ``clear_scratch`` empties it first (a caller's checkpoints of an earlier run)."""
    created = create_embedding(client, name, vectors, init_text)
    folder = created.parent / scratch
    if clear_scratch:
        shutil.rmtree(folder, ignore_errors=True)
    # Reloaded by force: *Create embedding* reloads only when the folder's mtime changed, which overwriting a file
    # does not do, and a trained embedding left in memory would make the host skip training ("already trained").
    client.call("POST", "/sdapi/v1/refresh-embeddings")
    if name not in loaded(client):
        progress(f"the webui did not load its own {created.name} (its pickle check refuses .pt files of a "
                 f"recent torch): registering a PNG-embedding copy in {folder}")
        convert(created, folder / f"{name}.png")
        refresh(client, [name])
    return folder


def create_embedding(client: WebuiClient, name: str, vectors: int, init_text: str) -> Path:
    """The built-in's *Create embedding*; returns the file it wrote."""
    answer = str(client.call("POST", "/sdapi/v1/create/embedding", {
        "name": name, "num_vectors_per_token": vectors, "overwrite_old": True, "init_text": init_text}).get("info"))
    found = re.fullmatch(r"create embedding filename: (.+)", answer.strip())
    if not found:
        raise TIError(f"the webui's built-in Create embedding failed: {answer!r}")
    return Path(found.group(1))


def refresh(client: WebuiClient, names: list[str]) -> None:
    """The host's *refresh embeddings*, then ``names`` must be loaded."""
    client.call("POST", "/sdapi/v1/refresh-embeddings")
    absent = [n for n in names if n not in loaded(client)]
    if absent:
        raise TIError(f"the webui did not register the embedding(s) {absent} after refresh-embeddings; is the "
                      "embeddings folder it reports the one it loads (--embeddings-dir)?")


def loaded(client: WebuiClient) -> set[str]:
    return set(client.call("GET", "/sdapi/v1/embeddings").get("loaded") or {})


def train_body(*, name: str, data_dir: str, log_dir: str, steps: int, width: int, height: int,
               learning_rate: str = "0.005", batch_size: int = 1, template: str = "subject.txt",
               latent_sampling: str = "once", save_every: int = 0, task_id: str = "ti-bench") -> dict:
    """The 30 arguments of the host's ``train_embedding`` (its API requires all), its Train tab's defaults where
    not given: no previews; a save interval of 0 becomes ``steps`` (one save at the end), because the host
    fails when both are 0."""
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


def train(client: WebuiClient, body: dict, *, timeout: float = TRAIN_TIMEOUT_S) -> str:
    """Run the built-in trainer (the call blocks until its run ends); returns its answer, or raises with the
    reason: the host answers 200 to everything, so its text is what says whether training ran."""
    answer = str(client.call("POST", "/sdapi/v1/train/embedding", body, timeout=timeout).get("info"))
    check_train_answer(answer)
    return answer


def final_file(answer: str) -> str:
    """The file named in a train answer, ``train embedding complete: filename: <file> error: None``."""
    return answer.partition("filename: ")[2].partition(" error:")[0]


def check_train_answer(answer: str) -> None:
    if answer.startswith("train embedding complete:") and answer.endswith("error: None"):
        return
    if "takes exactly one argument" in answer or "Sampler" in answer:
        raise TIError(f"{SAMPLER_BUG}. Its API answered (status 200): {answer!r}")
    raise TIError(f"the webui's built-in trainer failed (its API answered 200 with): {answer!r}")


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
