"""The one-screen summary printed after a run (CLI and demo)."""

from __future__ import annotations


def print_summary(result) -> None:
    from sails_fast.core import distributed

    if not distributed.is_main():  # one summary per run, rank 0's
        return
    print(f"run directory: {result.out_dir}")
    if result.steps_reused:
        print(f"reused: {', '.join(result.steps_reused)}")
    for step, reason in result.reasons.items():
        print(f"recomputed {step}: {reason}")
    for step, seconds in result.seconds.items():
        print(f"  {step:9} {seconds:8.1f} s")
    if result.after is not None:
        from sails_fast.evaluation.results import compare

        print(compare(result.before, result.after))
    if result.report_path is not None:
        print(f"report: {result.report_path}")
