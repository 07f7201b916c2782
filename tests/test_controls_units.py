"""The training controls' rules, exactly (issue 12): auto values, the OOM back-off's steps, the fault hook's
grammar, and how the report ranks a sweep. The behaviour through the CLI is in test_controls_submit.py and
test_controls_train.py."""

from __future__ import annotations

import pytest

from loraq.errors import FailureKind, classify
from loraq.queue import auto
from loraq.report import sweeps_of


@pytest.mark.parametrize(("n", "epochs"), [(1, 25), (10, 10), (20, 5), (33, 3), (34, 3), (1000, 3), (8333, 3),
                                           (8334, 2), (12_500, 2), (12_501, 1), (1_000_000, 1)])
def test_auto_epochs_follow_the_openai_rule(n: int, epochs: int) -> None:
    # 3 epochs; n*3 < 100 -> min(25, 100 // n); n*3 > 25,000 -> max(1, 25,000 // n)
    assert auto.epochs_for(n)[0] == epochs


def test_auto_batch_is_a_power_of_two_share_of_the_rows_within_a_token_budget() -> None:
    assert auto.batch_for(5000, 100, None)[:2] == (8, 1)  # 0.2% of 5,000 = 10 -> 8
    assert auto.batch_for(200_000, 1024, None)[:2] == (16, 16)  # 256 a step; 16,384 tokens hold 16 rows of 1,024
    assert auto.batch_for(200_000, 1024, 4)[:2] == (16, 4)  # the job's own grad_accum is kept
    assert auto.batch_for(10, 50, None)[:2] == (1, 1)
    lr, _ = auto.learning_rate_for(16)
    assert lr == 2e-4 and auto.learning_rate_for(64)[0] == 4e-4 and auto.learning_rate_for(1)[0] == 5e-5


def test_the_back_off_keeps_the_examples_per_step_then_checkpoints_then_gives_up() -> None:
    from loraq.train.controls import Batching, after_oom

    steps, current = [], Batching(12, 1)
    while (current := after_oom(current)) is not None:  # type: ignore[assignment]
        steps.append((current.batch_size, current.grad_accum, current.gradient_checkpointing))
    assert steps == [(6, 2, False), (3, 4, False), (1, 12, False), (1, 12, True)]
    assert all(b * g == 12 for b, g, _ in steps)


def test_the_fault_hook_grammar_and_the_real_exceptions_it_raises() -> None:
    from loraq.train.controls import asked
    from loraq.train.faults import Fault

    fault = Fault.parse("cuda-oom@3:batch>2:nogc")
    assert fault == Fault("cuda-oom", 3, 2, True)
    assert fault.applies(3, 4, False) and not fault.applies(3, 2, False) and not fault.applies(3, 4, True)
    assert Fault.parse("bug") is None and Fault.parse(None) is None
    with pytest.raises(ValueError, match="expected bug, or cuda-oom"):
        Fault.parse("oom@3")
    import torch

    cuda = Fault("cuda-oom", 1).exception(4)
    cpu = Fault("cpu-oom", 1).exception(1)
    assert type(cuda) is torch.OutOfMemoryError and type(cpu) is RuntimeError
    assert classify(cuda) is FailureKind.OOM and classify(cpu) is FailureKind.OOM
    assert asked(cuda) == "0.50 GiB" and asked(cpu) == "128.00 MiB"
    assert not FailureKind.MEMORY.retryable


def test_the_report_ranks_a_sweep_by_eval_loss_and_marks_the_best_that_passed() -> None:
    def job(name: str, status: str, loss: float | None, i: int) -> dict:
        return {"id": i, "name": name, "status": status, "eval_loss": loss, "base_eval_loss": 3.0, "group": "lr",
                "sweep": {"training.learning_rate": i}}

    jobs = [job("a", "completed", 2.0, 1), job("b", "failed", 1.0, 2), job("c", "completed", 1.5, 3),
            job("d", "pending", None, 4), {"id": 5, "name": "plain", "group": None}]
    (group,) = sweeps_of(jobs).values()
    assert [e["name"] for e in group["ranking"]] == ["c", "a", "b", "d"]
    assert group["best"] == "c" and [e["best"] for e in group["ranking"]] == [True, False, False, False]


def test_a_resume_copy_says_loraqs_batch_settings_and_the_checkpoint_itself_is_left_as_saved(tmp_path) -> None:
    """transformers keeps the train_batch_size a checkpoint was saved with (5.24: in its state, saved again;
    older releases trained with it); the copy a job resumes from says loraq's."""
    import json
    from types import SimpleNamespace

    from loraq import checkpoints
    from loraq.train.controls import Batching, settle_resume

    saved = tmp_path / "attempt-1" / "checkpoints" / "checkpoint-2"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text(json.dumps({"train_batch_size": 4, "save_steps": 2, "global_step": 2}))
    (saved / "adapter_model.safetensors").write_bytes(b"weights")
    checkpoints.mark_complete(saved, step=2)
    args = SimpleNamespace(n_gpu=0, logging_steps=1, eval_steps=3, save_steps=3)
    copy = settle_resume(str(saved), tmp_path / "attempt-1" / "resume", Batching(2, 2), args)
    state = json.loads((tmp_path / "attempt-1" / "resume" / "checkpoint-2" / "trainer_state.json").read_text())
    assert copy.endswith("resume/checkpoint-2")
    assert (state["train_batch_size"], state["save_steps"], state["eval_steps"], state["global_step"]) == (2, 3, 3, 2)
    assert json.loads((saved / "trainer_state.json").read_text())["train_batch_size"] == 4
    assert checkpoints.is_complete(saved)  # its marker still matches every file
