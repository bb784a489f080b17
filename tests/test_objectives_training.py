"""Every objective trains end to end through the real trainer (the inputs it declares are computed),
resumes exactly, and the error for a missing prerequisite is one clear sentence."""

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL
from lipkit.config import config_from_dict
from lipkit.errors import UserError
from lipkit.train.launch import run_training


def cfg(table, out, objective, per_image=1, **extra):
    return config_from_dict(
        {
            "data": {"train": str(table), "captions_per_image": per_image},
            "model": {"overrides": TINY_MODEL},
            "tokenizer": {"vocab_size": 400},
            "train": {
                "output": str(out),
                "batch_size": 16,
                "epochs": 2,
                "warmup_steps": 2,
                "log_every": 1,
                "precision": "fp32",
                "objective": objective,
                **extra,
            },
        }
    )


@pytest.mark.parametrize(
    "objective, per_image, extra",
    [
        ("infonce", 1, {}),
        ("siglip", 1, {"init_logit_scale": 10.0, "objective_args": {"chunk_size": 5}}),
        ("filip", 1, {}),
        ("multi_positive", 3, {}),
        ("dreamlip", 3, {"objective_args": {"threshold": 0.2}}),
        ("alip", 2, {}),
        ("tcl", 2, {}),
        ("tcl_momentum", 1, {"objective_args": {"queue_size": 32}}),
        ("rs_m_clip", 1, {"objective_args": {"local_crops": 2, "prototypes": 64}}),
        ("lexlip", 1, {}),
        ("nevlp", 3, {"objective_args": {"multi_positive": True, "warmup_steps": 2, "refit_every": 2}}),
        ("unime", 1, {"objective_args": {"hard_negatives": 3}}),
        ("wukong", 1, {"objective_args": {"image_tokens_kept": 4}}),
        ("improved_baselines", 1, {"objective_args": {"image_ssl": "barlow_twins"}}),
        ("plip", 1, {"objective_args": {"identity": "concept", "attributes": ["category"]}}),
    ],
)
def test_each_objective_trains(table, tmp_path, objective, per_image, extra):
    _, result = run_training(cfg(table, tmp_path / "run", objective, per_image, **extra))
    assert result.steps > 0 and math.isfinite(result.last_loss) and result.faults == 0
    state = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert ("logit_bias" in state) == (objective == "siglip")
    # LexLIP's heads are part of the model (one per tower, over the tokenizer's vocabulary)
    assert ("image_lexicon.proj.weight" in state) == (objective == "lexlip")
    if objective == "lexlip":
        from lipkit.checkpoint import load_checkpoint

        model, tokenizer, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
        assert model.spec.lexicon_vocab == tokenizer.vocab_size
        ids = tokenizer(["a red apple", "a cat"])
        lex = model.encode_text_lexical(ids)
        assert lex.shape == (2, tokenizer.vocab_size) and (lex >= 0).all()


def test_missing_second_caption_is_a_clear_error(table, tmp_path):
    with pytest.raises(UserError, match="needs two captions per image; set data.captions_per_image=2"):
        run_training(cfg(table, tmp_path / "run", "alip", 1))


def test_caption_owner_groups_captions_of_one_image(table):
    from lipkit.data.sources.registry import read_table
    from lipkit.data.table_batches import TrainBatches

    records = read_table(table)
    batches = TrainBatches(records, 32, 8, seed=0, captions_per_image=3)
    images, captions, keys = next(batches.epoch(0))
    assert images.shape[0] == 8 and len(captions) == 24 and len(keys) == 8
    by_key = {str(r.image): r.captions for r in records}
    for i, key in enumerate(keys):
        mine = captions[3 * i : 3 * i + 3]
        assert set(mine) <= set(by_key[key])
        assert len(set(mine)) == min(3, len(set(by_key[key])))  # distinct when the row has enough
    again = next(batches.epoch(0))
    assert again[1] == captions and torch.equal(again[0], images)  # deterministic for (seed, epoch)
