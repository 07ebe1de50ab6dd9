"""`tuneship-torchrun`: torchrun, with the exit code a preempted job needs.

It takes torchrun's arguments unchanged (`tuneship-torchrun --nproc-per-node 8 -m tuneship train
--config ...`). Plain torchrun exits 1 when it is preempted, whichever way the signal comes:
- SIGTERM to the agent (the pod is evicted): it forwards the signal, waits for the workers
  (which checkpoint and exit 143), then dies of an uncaught SignalException: exit 1;
- SIGTERM to a worker only, or to another pod's agent in a multi-pod job: the workers agree to
  stop (checkpoints.SaveOnSigterm), exit 143, and the agent reports a failed child: exit 1.
Exit 1 reads as a permanent failure to a Job's podFailurePolicy or a PyTorchJob's
restartPolicy: ExitCode. Here both cases exit 143, so the job is retried and resumes.

On CPU, each worker computes on its share of the cores: torchrun sets OMP_NUM_THREADS=1 for every
worker when there are several (right for GPU workers, a sixteenth of a 16-core machine for two
CPU ones); here, without CUDA and unless OMP_NUM_THREADS is set, it is the usable cores divided
by the workers of this node.

The agent gives workers `--shutdown-timeout` seconds (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default
30) after forwarding a signal, then kills them: set it below the pod's grace period and above
the time a checkpoint takes (k8s/ does; the `preempted` event reports that time).
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPTED = 128 + signal.SIGTERM  # what tuneship.infra.errors.Preempted exits with


def preempted(exit_codes: set[int]) -> bool:
    """Every failed worker stopped on SIGTERM: checkpointed (143) or killed by it (-15)."""
    return bool(exit_codes) and exit_codes <= {PREEMPTED, -signal.SIGTERM}


def cpu_threads_per_worker(cores: int, workers: int) -> int:
    return max(1, cores // max(1, workers))


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    workers = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0))
        os.environ["OMP_NUM_THREADS"] = str(cpu_threads_per_worker(cores, workers))
    try:
        run(args)
    except SignalException as exc:
        # the agent itself was signalled; it has already forwarded the signal to the workers
        # and waited up to --shutdown-timeout for their checkpoint
        print(f"tuneship-torchrun: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if not preempted(codes):
            raise
        print("tuneship-torchrun: workers preempted (exit 143)", file=sys.stderr, flush=True)
        return PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
