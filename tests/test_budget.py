"""The time budget against a fake clock: it ends on time when the speed changes, and its estimates' closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from hf_ibproj.budget import (
    FINAL_EVAL_MARGIN,
    FINAL_SAVE_SECONDS,
    TimeBudget,
    evaluation_estimate,
    planned_warmup,
    revised_estimate,
)

# the simulated loop steps the schedule without an optimizer step (no gradients here)
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(step_seconds, *, budget_s=600.0, startup_s=20.0, steps_per_epoch=500, final_s=30.0, monitor_s=4.0,
             warmup=50):
    """A run as the loop drives its budget: start-up, steps at `step_seconds(elapsed)`, an epoch-end monitor (its
    time as estimated), a plan wherever one is due, then the final phase (as estimated). Returns (end time, the
    learning-rate factor of every step, steps, the factor after the last step)."""
    clock = FakeClock()
    clock.now = startup_s
    budget = TimeBudget(budget_s, started_at=0.0, steps_per_epoch=steps_per_epoch, images_per_step=64,
                        estimate=(final_s, monitor_s), clock=clock)
    step, total = 0, 1000 * steps_per_epoch
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total)  # transformers' warm-up + cosine
    factors = []
    while step < total:  # as pretrain.train_loop: the step, the schedule, the budget, an epoch end's monitor
        factors.append(schedule.get_last_lr()[0])
        clock.now += step_seconds(clock.now)
        schedule.step()
        step += 1
        budget.step_done()
        if budget.plan_due(step):
            total = budget.plan(step)
            schedule = get_cosine_schedule_with_warmup(optimizer, planned_warmup(warmup, total), total,
                                                       last_epoch=step - 1)
        if step % steps_per_epoch == 0:
            clock.now += monitor_s
            budget.monitor_done((final_s, monitor_s))
    return clock.now + final_s, factors, step, schedule.get_last_lr()[0]


@pytest.mark.parametrize("factor", [4.0, 0.25])
@pytest.mark.parametrize("at_s", [60.0, 300.0, 540.0])
def test_a_run_ends_within_5_percent_of_its_budget_when_its_speed_changes_4x(factor, at_s):
    end, _, steps, last_factor = simulate(lambda now: 0.1 * (factor if now >= at_s else 1.0))
    assert abs(end - 600.0) <= 0.05 * 600.0, (end, steps)
    assert last_factor == pytest.approx(0.0, abs=1e-12)  # the cosine schedule reached its end at the last step


def test_a_short_budget_still_decays_its_learning_rate_to_the_end():
    # 60 s at 0.1 s per step leave ~250 steps, fewer than the configured warm-up of 1,000: the plan halves it
    end, factors, steps, last_factor = simulate(lambda now: 0.1, budget_s=60.0, startup_s=5.0, final_s=5.0,
                                                warmup=1000)
    assert abs(end - 60.0) <= 3.0 and steps < 1000
    assert max(factors) == pytest.approx(1.0, abs=0.02) and factors[-1] < 0.01 and last_factor == 0.0


def test_a_steady_run_fills_its_budget_and_its_schedule_is_smooth():
    end, factors, steps, _ = simulate(lambda now: 0.1 * (1.0 + 0.15 * math.sin(now)))  # +-15% noise, steady mean
    assert 0.97 * 600 <= end <= 600.0
    # after the warm-up, the learning rate falls step by step: the re-plans do not make it jump back up
    decay = factors[60:]
    assert all(later <= earlier + 0.01 for earlier, later in zip(decay, decay[1:]))
    # closed form: (600 s x 0.99 - 20 s start-up - 30 s final - the monitors) at 0.1 s per step
    monitors = (steps // 500) * 4.0
    assert steps == pytest.approx((0.99 * 600 - 20 - 30 - monitors) / 0.1, rel=0.02)


def test_a_resumed_run_spends_only_what_is_left_of_its_budget():
    clock = FakeClock()
    clock.now = 1000.0  # the resumed process starts; the run had spent 400 s of 600 before it
    budget = TimeBudget(600, started_at=1000.0, steps_per_epoch=10**6, images_per_step=64, estimate=(10.0, 0.0),
                        used_s=400.0, clock=clock)
    for _ in range(30):
        clock.now += 0.5
        budget.step_done()
    assert budget.plan_due(30)
    # 0.99 * 600 - 400 s before - 15 s of this process - 10 s final = 169 s left at 0.5 s per step
    total = budget.plan(30)
    assert total == 30 + int((0.99 * 600 - 400 - 15 - 10) / 0.5)
    state = budget.state_dict()  # what the next checkpoint keeps, and a run resumed from it starts with
    assert state["seconds"] == 600 and state["used_s"] == 415.0 and state["plan"]["total_steps"] == total
    assert TimeBudget(600, started_at=0.0, steps_per_epoch=10**6, images_per_step=64, estimate=(10.0, 0.0),
                      used_s=state["used_s"], plan=state["plan"]).latest == state["plan"]


def test_the_first_plan_waits_for_timed_steps_and_later_ones_come_every_few_steps():
    clock = FakeClock()
    budget = TimeBudget(600, started_at=0.0, steps_per_epoch=100, images_per_step=64, estimate=(10.0, 1.0),
                        clock=clock)
    due = []
    for step in range(1, 61):
        clock.now += 0.1
        budget.step_done()
        if budget.plan_due(step):
            due.append(step)
            budget.plan(step)
    assert due[0] == 20  # 10 untimed steps, then 10 timed ones
    assert due[1:] == [30, 40, 50, 60]
    assert budget.latest["planned_at_step"] == 20 and budget.latest["img_per_s"] == pytest.approx(640.0)


def test_evaluation_estimate_extrapolates_the_random_init_evaluation_to_the_full_splits():
    random_init = {"seconds": {"feature_extraction": 6.0, "linear_probe": 2.0, "knn": 0.5, "label_free": 1.0},
                   "num_train": 1000, "num_test": 200}
    margin = FINAL_EVAL_MARGIN
    final, monitor = evaluation_estimate(random_init, (6000, 1000), (1000, 200))
    # 7000 of 1200 images extracted, a probe on 6x the rows, kNN on 6 x 5 = 30x the pairs, the same 1000 diagnostics
    assert final == pytest.approx(FINAL_SAVE_SECONDS + margin * (6.0 * 7000 / 1200 + 2.0 * 6 + 0.5 * 30 + 1.0))
    assert monitor == pytest.approx(margin * (6.0 + 0.5 + 1.0))  # the floor ran on the monitor's subsets: no probe
    # a floor stored with other sizes is scaled to the monitor's
    _, monitor = evaluation_estimate(random_init, (1000, 200), (500, 100))
    assert monitor == pytest.approx(margin * (6.0 * 600 / 1200 + 0.5 * 0.25 + 1.0))
    assert evaluation_estimate(None, (6000, 1000), (1000, 200)) == (FINAL_SAVE_SECONDS, 0.0)


def test_revised_estimate_takes_the_measured_monitor_in_place_of_the_margin():
    random_init = {"seconds": {"feature_extraction": 6.0, "linear_probe": 2.0, "knn": 0.5, "label_free": 1.0},
                   "num_train": 1000, "num_test": 200}
    # the monitor extrapolates to 6 + 0.5 + 1 = 7.5 s at ratio 1 and took 3 s: the whole final phase (extraction,
    # the probe on 6x the rows, kNN, diagnostics) is taken at 3 / 7.5, e.g. after a floor timed on a busy machine
    final, monitor, ratio = revised_estimate(random_init, (6000, 1000), (1000, 200), 3.0)
    assert ratio == pytest.approx(0.4) and monitor == 3.0
    assert final == pytest.approx(FINAL_SAVE_SECONDS + 0.4 * (6.0 * 7000 / 1200 + 2.0 * 6 + 0.5 * 30 + 1.0))
    assert revised_estimate(None, (6000, 1000), (1000, 200), 3.0) == (FINAL_SAVE_SECONDS, 3.0, None)
    tiny = {"seconds": {"feature_extraction": 0.01, "linear_probe": 0.01, "knn": 0.0, "label_free": 0.0},
            "num_train": 1000, "num_test": 200}
    assert revised_estimate(tiny, (6000, 1000), (1000, 200), 0.5)[2] == FINAL_EVAL_MARGIN
