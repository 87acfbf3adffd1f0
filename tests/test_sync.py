"""The claims and step counters the CPU time loops schedule their tiles with."""
import numba
import numpy as np
import pytest
from numba import njit, prange

from nblstm.kernels import sync
from nblstm.kernels.cpu import ROWS_PER_TILE, _claim_in_order, _step_tiles, _tile_bounds

N_TASKS = 7
N_STEPS = 300


@njit(inline="always")
def _run_worker(worker, n_workers, claims, done, runs, order):
    """One worker of a time loop, claiming in the loops' own order: per step,
    claim tasks, count them, wait for the step.

    runs[step, task] counts how often the task ran; order[step, task] is the
    step the previous step's tasks had all finished by when this task ran.
    """
    n_steps, n_tasks = runs.shape
    for step in range(n_steps):
        for offset in range(n_tasks):
            task = _claim_in_order(claims, step, worker, n_workers, n_tasks, offset)
            if task >= 0:
                runs[step, task] += 1
                order[step, task] = sync.atomic_load(done, max(step - 1, 0) * sync.SLOT_STRIDE)
                sync.finish(done, step)
        sync.wait_until_done(done, step, n_tasks)


@njit(parallel=True)
def _run_parallel(n_workers, claims, done, runs, order):
    for worker in prange(n_workers):
        _run_worker(worker, n_workers, claims, done, runs, order)


@njit
def _run_one_after_another(n_workers, claims, done, runs, order):
    for worker in range(n_workers):
        _run_worker(worker, n_workers, claims, done, runs, order)


def test_a_task_is_claimed_once_per_step():
    claims, _ = sync.counters(2, 1)

    @njit
    def claims_of(claims):
        return (sync.claim(claims, 0, 0), sync.claim(claims, 0, 0), sync.claim(claims, 1, 0),
                sync.claim(claims, 0, 3), sync.claim(claims, 0, 2))

    assert claims_of(claims) == (True, False, True, True, False)


@pytest.mark.parametrize("runner", [_run_parallel, _run_one_after_another],
                         ids=["concurrent", "one-after-another"])
def test_every_task_runs_once_per_step_after_the_previous_step(runner):
    n_workers = max(2, numba.get_num_threads())
    claims, done = sync.counters(N_TASKS, N_STEPS)
    runs = np.zeros((N_STEPS, N_TASKS), np.int64)
    order = np.full((N_STEPS, N_TASKS), -1, np.int64)
    runner(n_workers, claims, done, runs, order)
    np.testing.assert_array_equal(runs, 1)
    # Every task of step s > 0 saw all N_TASKS tasks of step s - 1 counted.
    np.testing.assert_array_equal(order[1:], N_TASKS)
    np.testing.assert_array_equal(done[::sync.SLOT_STRIDE], N_TASKS)


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_a_step_covers_every_tile_and_runs_each_short_row_tile_last(step):
    """One worker claiming a step's tiles in the loops' order (rising on even
    steps, falling on odd ones) meets every (direction, rows, units) tile
    once, and within each unit tile runs the short last row tile last."""
    n_dirs, n_rows, hidden, tile_units, n_unit_tiles = 2, 2 * ROWS_PER_TILE + 5, 100, 64, 2
    n_row_tiles, n_tiles = _step_tiles(n_rows, n_dirs, n_unit_tiles, ROWS_PER_TILE)
    assert n_row_tiles == 3, "two full row tiles and a short one"
    claims, _ = sync.counters(n_tiles, 1)
    met = []
    for offset in range(n_tiles):
        tile = _claim_in_order(claims, step, 0, 1, n_tiles, offset)
        met.append(_tile_bounds(tile, n_row_tiles, n_unit_tiles, ROWS_PER_TILE, tile_units,
                                n_rows, hidden, step))
    expected = {(d, row * ROWS_PER_TILE, min((row + 1) * ROWS_PER_TILE, n_rows),
                 unit * tile_units, min((unit + 1) * tile_units, hidden))
                for d in range(n_dirs) for row in range(n_row_tiles)
                for unit in range(n_unit_tiles)}
    assert sorted(met) == sorted(expected)
    for d in range(n_dirs):
        for unit_lo in (0, tile_units):
            rows_met = [bounds[1] for bounds in met if bounds[0] == d and bounds[3] == unit_lo]
            assert rows_met[-1] == (n_row_tiles - 1) * ROWS_PER_TILE
