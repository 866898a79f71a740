"""The exercises' checks (tests/test_exercises.py) proven on worked answers (tests/exercise_key.py):
every correct answer passes, every plausible wrong one fails; and the "Then try" hooks of teaching/exercises.py
put answers into a model."""

from types import SimpleNamespace

import pytest
import torch

from teaching import exercises
from panda import GSTRA, PandaConfig, VideoPanda
from tests import exercise_key
from tests.test_exercises import CHECKS, randomize


def cases(answers):
    """pytest cases (exercise, answer), each named after its answer."""
    return [pytest.param(exercise, answer, id=answer.__name__) for exercise, group in answers.items() for answer in group]


@pytest.mark.parametrize("exercise, answer", cases(exercise_key.RIGHT))
def test_every_correct_answer_passes(exercise, answer):
    CHECKS[exercise](answer)


@pytest.mark.parametrize("exercise, answer", cases(exercise_key.WRONG))
def test_every_wrong_answer_fails(exercise, answer):
    with pytest.raises(AssertionError):
        CHECKS[exercise](answer)


def test_model_hooks_put_the_answers_into_the_stab(monkeypatch):
    monkeypatch.setattr(exercises, "FrameQueryFSRA", exercise_key.FrameQueryFSRA)
    monkeypatch.setattr(exercises, "gstra_per_frame", exercise_key.gstra_per_frame_right)
    cfg = PandaConfig.preset("nano")
    model = exercises.with_frame_query_fsra(VideoPanda(cfg))
    assert isinstance(model.stab.fsra, exercise_key.FrameQueryFSRA)
    gstra = randomize(GSTRA(cfg)).eval()
    model = SimpleNamespace(stab=SimpleNamespace(gstra=gstra), cfg=cfg)
    per_frame = exercises.with_gstra_per_frame(model).stab.gstra
    local = torch.randn(3, cfg.chunk_frames, 4, 4, 32)  # what the STAB gives GSTRA, flattened: (N, k*p*p, C)
    torch.testing.assert_close(per_frame(local.flatten(1, 3)), exercise_key.gstra_per_frame_right(gstra, local))
    with pytest.raises(ValueError, match="--fsra=false"):
        exercises.with_frame_query_fsra(VideoPanda(PandaConfig.preset("nano", fsra=False)))
