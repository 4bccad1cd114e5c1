"""The checkpoint module with real Orbax on disk: which step "best" means, and that keep-last-N keeps it."""

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.checkpoint import Checkpointer, CheckpointError, load_variables

ACCURACIES = {1: 0.30, 2: 0.90, 3: 0.50, 4: 0.20, 5: 0.60}  # the best, step 2, is not among the last two


def arrays(step):
    """A state whose every value is its step, so a restored state tells which checkpoint it came from."""
    return {"params": {"fc": {"kernel": jnp.full((2, 3), float(step))}},
            "batch_stats": {"bn": {"mean": jnp.full((3,), float(step))}}, "step": jnp.asarray(step)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Steps 1-3 in one session, 4-6 in a second one (a resumed run), keeping the last two plus the best."""
    workdir = tmp_path_factory.mktemp("run")
    for steps in ((1, 2, 3), (4, 5, 6)):
        checkpoints = Checkpointer(workdir / "checkpoints", keep=2)
        for step in steps:
            checkpoints.save(step, arrays(step), None, {"class_names": ["a", "b", "c"]}, {"model": "m"},
                             ACCURACIES.get(step))  # step 6: saved without an evaluation
        checkpoints.close()
    return workdir


def test_keep_last_n_also_keeps_the_best_across_sessions(workdir):
    checkpoints = Checkpointer(workdir / "checkpoints", keep=2)
    try:
        assert checkpoints.steps() == [2, 5, 6]
        assert checkpoints.best_step() == 2
        assert [checkpoints.val_accuracy(s) for s in (2, 5, 6)] == [0.90, 0.60, None]  # 6: not evaluated
    finally:
        checkpoints.close()


def test_step_best_loads_the_best_checkpoint_and_a_number_that_one(workdir):
    _, best, names = load_variables(workdir, "best")
    np.testing.assert_array_equal(best["params"]["fc"]["kernel"], 2.0)
    np.testing.assert_array_equal(best["batch_stats"]["bn"]["mean"], 2.0)
    assert names == ["a", "b", "c"]
    _, latest, _ = load_variables(workdir)
    np.testing.assert_array_equal(latest["params"]["fc"]["kernel"], 6.0)
    _, fifth, _ = load_variables(workdir, "5")
    np.testing.assert_array_equal(fifth["params"]["fc"]["kernel"], 5.0)


def test_a_step_that_was_not_kept_is_a_clear_error(workdir):
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 3 .* it has steps \[2, 5, 6\]"):
        load_variables(workdir, 3)


def test_reading_a_directory_without_checkpoints_changes_nothing(tmp_path):
    """Orbax's manager creates the directory it opens: a failed read (train.predict/evaluate/export pointed at the
    wrong place) left an empty checkpoints/ behind, which then hid a saved model there from the next load."""
    from resnet_jax.checkpoint import save_variables

    with pytest.raises(CheckpointError, match="no checkpoint in .*checkpoints: train first"):
        load_variables(tmp_path)
    assert list(tmp_path.iterdir()) == []
    save_variables(tmp_path, {k: v for k, v in arrays(7).items() if k != "step"}, {"model": "m"}, ["a", "b", "c"])
    (tmp_path / "checkpoints").mkdir()  # as the failed read used to leave it
    _, variables, names = load_variables(tmp_path)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], 7.0)
    assert names == ["a", "b", "c"]
