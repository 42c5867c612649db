"""What every entry point does first, once per process."""

from __future__ import annotations


def prepare_process(processes: int = 1, loader_workers: int = 0) -> None:
    """Silence library messages that are not the user's business and set torch's CPU threads (logged once);
    ``processes``: the training processes on this node, ``loader_workers``: each one's data loader workers."""
    from src.utils.quiet import silence_library_noise
    from src.utils.threads import configure_threads

    silence_library_noise()
    configure_threads(processes, loader_workers)
