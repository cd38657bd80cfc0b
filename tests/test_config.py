"""The config: overrides by dotted key, keys that moved, and configs saved by an older agx."""

import pytest

from agx.config import RENAMED, Config, apply_override
from agx.errors import UserError


def test_an_override_sets_the_field_with_its_type():
    cfg = Config()
    apply_override(cfg, "train.steps=7")
    apply_override(cfg, "mesh.sequence_parallel=yes")
    apply_override(cfg, "train.profile_steps=[2,3]")
    assert (cfg.train.steps, cfg.mesh.sequence_parallel, cfg.train.profile_steps) == (7, True, [2, 3])
    with pytest.raises(UserError, match="unknown config key 'train.stepz'"):
        apply_override(cfg, "train.stepz=3")


def test_a_moved_key_sets_its_new_place_and_says_so_once(capsys):
    cfg = Config()
    apply_override(cfg, "model.pipeline_repeats=2")
    apply_override(cfg, "train.pipeline_microbatches=8")
    apply_override(cfg, "train.pipeline_schedule=1f1b")
    assert (cfg.pipeline.repeats, cfg.pipeline.microbatches, cfg.pipeline.schedule) == (2, 8, "1f1b")
    notices = capsys.readouterr().err.splitlines()
    assert notices == [f"agx: note: {old} is now {new}; the old name still works, for now" for old, new in RENAMED.items()]


def test_a_config_saved_under_the_old_names_reads_into_the_new_ones():
    saved = Config().to_dict()
    del saved["pipeline"]
    saved["model"]["pipeline_repeats"] = 2
    saved["train"].update(pipeline_microbatches=8, pipeline_schedule="gpipe")
    cfg = Config.from_dict(saved)
    assert (cfg.pipeline.repeats, cfg.pipeline.microbatches, cfg.pipeline.schedule) == (2, 8, "gpipe")
    assert Config.from_dict(cfg.to_dict()) == cfg
