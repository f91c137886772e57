"""The time budget of a pretraining run (`--time-budget MINUTES`): how many optimizer steps fit in it.

The budget covers the whole run: start-up, training, the epoch-end kNN monitors and the final evaluation. Every
REPLAN_EVERY steps the total step count is planned anew from the step time of the latest WINDOW_SECONDS of training,
aiming the last step at the deadline less the final phase. Because every plan aims at the deadline, a wrong or
outdated step time bends the learning-rate schedule a little but does not move the end: a run whose speed changes
(a laptop that gets busy, a GPU that throttles) still ends on time. The cosine schedule is rebuilt from
(step, warm-up, total) after each plan, so it reaches its end at the last step.

The final phase and each monitor are estimated from the random-init evaluation at the start of the run
(`evaluation_estimate`), and from the latest monitor's measured time once one has run (`revised_estimate`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

TARGET = 0.99  # each plan aims at this share of the budget
SKIP_STEPS = 10  # steps after a (re)start that are not timed: allocations, kernel selection, caches
MIN_TIMED_STEPS = 10  # the first plan waits for this many timed steps
WINDOW_SECONDS = 60.0  # the step time is the mean over the latest this many seconds of steps
REPLAN_EVERY = 10  # steps between plans
FINAL_EVAL_MARGIN = 0.7  # the trained backbone's evaluation against the random-init one's (measured: RESULTS.md)
FINAL_SAVE_SECONDS = 5.0  # saving the model, the plot and the records


def planned_warmup(configured: int, total: int) -> int:
    """The warm-up steps of a plan: the configured ones, but at most half the plan, so that a short budget still
    decays its learning rate to zero at the last step."""
    return min(configured, total // 2)


def evaluation_estimate(random_init: dict | None, final_rows: tuple[int, int], monitor_rows: tuple[int, int],
                        ratio: float = FINAL_EVAL_MARGIN) -> tuple[float, float]:
    """(final phase, one kNN monitor) in seconds, from the random-init evaluation (same architecture and images).

    That evaluation runs on the kNN monitor's subsets; its times are extrapolated to (train, held-out) row counts,
    `final_rows` for the final evaluation and `monitor_rows` for a monitor: extraction scales with the images, the
    L-BFGS probe with the training rows, kNN with their product; the label-free diagnostics use the same images
    every time. All of it is taken at `ratio`: the trained backbone's evaluation against the random-init one's.
    """
    if random_init is None:
        return FINAL_SAVE_SECONDS, 0.0
    seconds, rows_train, rows_test = random_init["seconds"], random_init["num_train"], random_init["num_test"]

    def features_and_knn(num_train: int, num_test: int) -> float:
        return (seconds["feature_extraction"] * (num_train + num_test) / (rows_train + rows_test)
                + seconds["knn"] * num_train * num_test / (rows_train * rows_test) + seconds.get("label_free", 0.0))

    probe = seconds["linear_probe"] * final_rows[0] / rows_train
    return (FINAL_SAVE_SECONDS + ratio * (probe + features_and_knn(*final_rows)),
            ratio * features_and_knn(*monitor_rows))


def revised_estimate(random_init: dict | None, final_rows: tuple[int, int], monitor_rows: tuple[int, int],
                     monitor_seconds: float) -> tuple[float, float, float | None]:
    """(final phase, one kNN monitor, ratio) in seconds once a monitor has run: the monitor as measured, the final
    phase extrapolated at the ratio of the measured monitor to its extrapolation (so a floor timed while the
    machine was busy does not inflate the final phase). The ratio is None without a
    random-init floor (the final phase is then only the saving), and FINAL_EVAL_MARGIN where the monitor
    extrapolates to under a second (too short to time)."""
    if random_init is None:
        return FINAL_SAVE_SECONDS, monitor_seconds, None
    extrapolated = evaluation_estimate(random_init, final_rows, monitor_rows, ratio=1.0)[1]
    ratio = monitor_seconds / extrapolated if extrapolated >= 1.0 else FINAL_EVAL_MARGIN
    return evaluation_estimate(random_init, final_rows, monitor_rows, ratio)[0], monitor_seconds, ratio


class TimeBudget:
    """Plans a run's total step count so that it ends `seconds` after it started, whatever its speed does.

    The loop calls `step_done()` after every optimizer step, `monitor_done()` after an epoch-end monitor (its time
    is not step time) and, where `plan_due(step)`, `plan(step)` for the new total. `used_s` seconds were spent by
    the run before this process and `plan` is its latest plan (a resumed run); `clock` is injectable for tests.

    Examples:
        >>> clock = iter(range(0, 10**6, 1)).__next__  # one second per step
        >>> budget = TimeBudget(120, started_at=0, steps_per_epoch=10**6, images_per_step=256,
        ...                     estimate=(10.0, 0.0), clock=clock)
        >>> for step in range(1, 31):
        ...     budget.step_done()
        >>> budget.plan(30)  # 30 steps + (0.99 * 120 s - 30 s gone - 10 s final phase) at one second per step
        108
    """

    def __init__(self, seconds: float, *, started_at: float, steps_per_epoch: int, images_per_step: int,
                 estimate: tuple[float, float], used_s: float = 0.0, plan: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.seconds, self.steps_per_epoch, self.images_per_step = seconds, steps_per_epoch, images_per_step
        self.clock = clock
        self.started_at, self.used_before = started_at, used_s
        self.final_s, self.monitor_s = estimate
        self.deadline = started_at - used_s + TARGET * seconds
        self.durations: deque[float] = deque()
        self.window_s, self.steps_seen, self.last_mark = 0.0, 0, None
        self.latest = plan  # the latest plan (a resumed run's: its checkpoint's), for the records

    def used_s(self) -> float:
        """Seconds of the budget spent so far, this process and the ones before it."""
        return self.used_before + self.clock() - self.started_at

    def step_done(self) -> None:
        now = self.clock()
        if self.last_mark is not None and self.steps_seen >= SKIP_STEPS:
            self.durations.append(now - self.last_mark)
            self.window_s += self.durations[-1]
            while len(self.durations) > MIN_TIMED_STEPS and self.window_s - self.durations[0] >= WINDOW_SECONDS:
                self.window_s -= self.durations.popleft()
        self.steps_seen += 1
        self.last_mark = now

    def monitor_done(self, estimate: tuple[float, float]) -> None:
        """An epoch-end monitor has run: the next step is timed from now; `estimate` (final phase, one monitor)."""
        self.final_s, self.monitor_s = estimate
        self.last_mark = self.clock()

    def plan_due(self, step: int) -> bool:
        return len(self.durations) >= MIN_TIMED_STEPS and (self.latest is None or step % REPLAN_EVERY == 0)

    def plan(self, step: int) -> int:
        """The total step count: `step` plus the steps that fit before the deadline less the final phase and the
        kNN monitors of the epoch ends they cross (never fewer than `step`)."""
        step_s = self.window_s / len(self.durations)
        available = self.deadline - self.clock() - self.final_s
        steps = 0
        for _ in range(3):  # the epoch ends crossed depend on the steps: iterate to a fixed point
            epoch_ends = (step + steps) // self.steps_per_epoch - step // self.steps_per_epoch
            steps = max(0, int((available - epoch_ends * self.monitor_s) / step_s))
        first = self.latest["planned_at_step"] if self.latest else step
        self.latest = {"time_budget_min": self.seconds / 60, "planned_at_step": first, "total_steps": step + steps,
                       "epochs": round((step + steps) / self.steps_per_epoch, 2), "step_s": round(step_s, 4),
                       "img_per_s": round(self.images_per_step / step_s, 1),
                       "knn_monitor_s": round(self.monitor_s, 2), "final_phase_s": round(self.final_s, 1)}
        return step + steps

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the budget, the seconds spent of it and the latest plan."""
        return {"seconds": self.seconds, "used_s": round(self.used_s(), 3), "plan": self.latest}
