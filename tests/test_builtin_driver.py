"""The built-in-trainer driver (lib_ti/remote/builtin.py) that both benchmarks use, against a stand-in for the
host's embedding endpoints: enough to test the driver's own logic, not proof of the host (test_webui_real is)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_ti.errors import TIError
from lib_ti.formats.embeddings import load_embedding
from lib_ti.remote import builtin


class HostEmbeddings:
    """The host's create/refresh/list embedding endpoints, with its pickle check refusing every ``.pt`` (as it does
    those of a recent torch) unless ``loads_pt``."""

    def __init__(self, folder: Path, *, loads_pt: bool = False, loads_copies: bool = True) -> None:
        self.folder, self.loads_pt, self.loads_copies, self.loaded = folder, loads_pt, loads_copies, set()

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float = 600) -> dict:
        if path == "/sdapi/v1/create/embedding":
            assert body is not None
            target = self.folder / f"{body['name']}.pt"
            vectors = torch.randn(body["num_vectors_per_token"], 32)
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": body["name"],
                        "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, target)
            return {"info": f"create embedding filename: {target}"}
        if path == "/sdapi/v1/refresh-embeddings":
            suffixes = {".pt"} if self.loads_pt else set()
            suffixes |= {".png", ".safetensors"} if self.loads_copies else set()
            self.loaded = {p.stem for p in self.folder.rglob("*") if p.suffix in suffixes}
            return {}
        assert path == "/sdapi/v1/embeddings", path
        return {"loaded": {name: {} for name in self.loaded}}


def test_a_refused_step0_file_is_registered_as_a_png_copy_that_keeps_its_vectors_and_step(tmp_path):
    host = HostEmbeddings(tmp_path)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "old-200.safetensors").write_bytes(b"an earlier run's")
    said = []
    scratch = builtin.create_registered(host, "tok", vectors=4, init_text="a photo", scratch="scratch",
                                        clear_scratch=True, progress=said.append)
    assert scratch == tmp_path / "scratch" and host.loaded == {"tok"} and "PNG-embedding copy" in said[0]
    assert sorted(p.name for p in scratch.iterdir()) == ["tok.png"]  # the earlier run's file is gone
    copy = load_embedding(scratch / "tok.png")
    created = torch.load(tmp_path / "tok.pt", weights_only=True)
    # a step (0), which a .safetensors copy would not carry: the host's trainer fails on None
    assert copy.name == "tok" and copy.step == 0
    assert torch.equal(next(iter(copy.vectors.values())), created["string_to_param"]["*"])


def test_a_loaded_step0_file_is_left_alone_and_an_unregistered_copy_is_an_error(tmp_path):
    host = HostEmbeddings(tmp_path, loads_pt=True)
    builtin.create_registered(host, "tok", vectors=1, init_text="a", scratch="scratch")
    assert not (tmp_path / "scratch").exists() and host.loaded == {"tok"}
    with pytest.raises(TIError, match=r"did not register the embedding\(s\) \['tok'\].*--embeddings-dir"):
        builtin.create_registered(HostEmbeddings(tmp_path, loads_copies=False), "tok", vectors=1, init_text="a",
                                  scratch="scratch")
