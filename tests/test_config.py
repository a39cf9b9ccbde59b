import json
from dataclasses import fields

import pytest
import yaml

from lib_ti.config import TrainConfig, check_paths
from lib_ti.errors import TIError
from lib_ti.options import field_help


def test_defaults_are_valid_and_every_field_is_documented():
    cfg = TrainConfig()
    assert cfg.planned_steps == cfg.steps
    undocumented = [f.name for f in fields(TrainConfig) if not field_help(f)]
    assert not undocumented
    ui = [f for f in fields(TrainConfig) if f.metadata["ui"]]
    assert all(f.metadata["section"] for f in ui), "every control of the tab belongs to a section"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"steps": 0}, "steps=0"),
        ({"num_vectors": 76}, "num_vectors=76"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"clip_mode": "both"}, "clip_mode='both'"),
        ({"width": 100}, "width=100"),
        ({"height": 32}, "height=32"),
        ({"name": "../evil"}, "name='../evil'"),
        ({"name": ""}, "name=''"),
        ({"tag_dropout": 1.0}, "tag_dropout=1.0"),
        ({"learning_rate": "0.05:abc"}, "learning rate schedule"),
        ({"clip_value": "-1"}, "clip value schedule"),
        ({"steps": "100"}, "expected int"),
        ({"flip": "yes"}, "expected bool"),
        ({"train_encoders": ["clip_x"]}, "train_encoders"),
        ({"preview_width": 65}, "preview_width=65"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(changes, fragment):
    with pytest.raises(TIError) as info:
        TrainConfig(**changes)
    assert fragment in str(info.value)
    assert str(info.value).startswith("[TI Trainer] ")


def test_numbers_from_yaml_are_accepted_where_text_or_float_is_expected():
    cfg = TrainConfig(learning_rate=0.01, min_snr_gamma=5)
    assert cfg.learning_rate == "0.01" and isinstance(cfg.min_snr_gamma, float)


def test_schedule_shorter_than_steps_plans_fewer_steps():
    assert TrainConfig(steps=1000, learning_rate="0.05:10, 0.005:200").planned_steps == 200


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    cfg = TrainConfig(name="cat toy", steps=123, learning_rate="0.05:10, 0.005", flip=True, train_encoders=["clip_l"])
    path = tmp_path / f"run{suffix}"
    cfg.save(path)
    assert TrainConfig.load(path) == cfg
    text = path.read_text()
    data = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    assert data["steps"] == 123


def test_unknown_keys_and_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 5\n")
    with pytest.raises(TIError, match=r"unknown config key\(s\) \['stepz'\]"):
        TrainConfig.load(path)
    path.write_text("steps: [\n")
    with pytest.raises(TIError, match="not valid YAML"):
        TrainConfig.load(path)
    path.write_text("- 1\n")
    with pytest.raises(TIError, match="mapping"):
        TrainConfig.load(path)
    with pytest.raises(TIError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_check_paths_before_any_model_work(tmp_path):
    with pytest.raises(TIError, match="model=''"):
        check_paths(TrainConfig(data_dir=str(tmp_path)))
    with pytest.raises(TIError, match="data_dir"):
        check_paths(TrainConfig(model=str(tmp_path), data_dir=str(tmp_path / "nope")))
    with pytest.raises(TIError, match="init_from"):
        check_paths(TrainConfig(model=str(tmp_path), data_dir=str(tmp_path), init_from=str(tmp_path / "x.pt")))
    check_paths(TrainConfig(model=str(tmp_path), data_dir=str(tmp_path)))


def test_resume_keeps_the_runs_settings_and_lists_what_changed(tmp_path):
    saved = TrainConfig(name="tok", data_dir=str(tmp_path), width=64, height=64, seed=3, steps=100)
    cfg, notes = saved.resumed({"steps": 300, "learning_rate": "0.002", "seed": 3, "width": 64})
    assert (cfg.steps, cfg.learning_rate, cfg.seed, cfg.width) == (300, "0.002", 3, 64)
    assert notes == ["steps: 100 -> 300", "learning_rate: '0.005' -> '0.002'"]
    assert saved.resumed({})[0] == saved
    same_folder = str(tmp_path / "sub" / "..")  # a path is the same path however it is spelled
    assert saved.resumed({"data_dir": same_folder})[1] == []
    with pytest.raises(TIError) as refused:
        saved.resumed({"seed": 4, "width": 512, "template": "style", "steps": 200})
    message = str(refused.value)
    assert "seed: run 3, given 4" in message and "width: run 64, given 512" in message and "template" in message
    assert "steps" not in message.split("differ from it:")[1].split(".")[0]  # steps may change: not refused
    with pytest.raises(TIError, match="unknown config key 'nope'"):
        saved.resumed({"nope": 1})


def test_only_settings_that_do_not_change_a_steps_computation_may_change_on_resume():
    free = {f.name for f in fields(TrainConfig) if f.metadata.get("resume")}
    assert {"steps", "learning_rate", "save_every", "preview_every", "keep_last"} <= free
    assert not free & {"seed", "data_dir", "template", "width", "height", "num_vectors", "batch_size", "grad_accum",
                       "optimizer", "precision", "crop", "flip", "init_text", "latent_sampling"}


def test_list_options_take_lists_of_names_only():
    """A nested list (or a list of numbers) where names are expected is refused, not passed on to the loop."""
    with pytest.raises(TIError, match="train_encoders=.*give a list of str"):
        TrainConfig(train_encoders=[["clip_l"]])  # type: ignore[list-item]
    with pytest.raises(TIError, match="give a list of str"):
        TrainConfig(train_encoders=[1])  # type: ignore[list-item]


def test_the_training_and_the_dataset_tools_check_sizes_alike(tmp_path):
    from lib_ti.dataset.prepare import PrepareOptions

    for owner, make in (("config", lambda **kw: TrainConfig(**kw)),
                        ("prepare", lambda **kw: PrepareOptions(src=str(tmp_path), dst=str(tmp_path / "o"), **kw))):
        with pytest.raises(TIError, match=f"{owner} width=100 is invalid: use a multiple of 8 from 64 to 4096"):
            make(width=100)
        with pytest.raises(TIError, match=f"{owner} bucket_min_side=100 is invalid: use 0 .automatic. or a multiple"):
            make(bucket_min_side=100)
        with pytest.raises(TIError, match=f"{owner} height=True is invalid: expected int"):
            make(height=True)
