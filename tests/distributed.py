"""Running a test body in several processes, gloo on the CPU, and collecting what each rank reports
(``benchmarks.processes``, which the frame-parallel suite shares)."""

from benchmarks.processes import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
