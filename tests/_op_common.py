"""Helpers shared by the op-family tests (test_krylov.py, test_hvp.py, test_sketch.py)."""
import torch


def on_one_and_many_threads(fn):
    """``(fn() on one thread, fn() on max(2, current) threads)``; the thread count is restored."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(max(2, threads))
        many = fn()
    finally:
        torch.set_num_threads(threads)
    return one, many
